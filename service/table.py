"""Plain-text rendering of a layer table, for `convserve describe` at a terminal."""

from __future__ import annotations

from service.card import Anatomy


def _dims(values: list[int] | None) -> str:
    return "-" if values is None else "x".join(str(v) for v in values)


def format_anatomy(anatomy: Anatomy) -> str:
    header = ("layer", "type", "kernel", "stride", "pad", "output", "params", "MACs", "RF")
    rows = [header]
    for row in anatomy.rows:
        rows.append(
            (
                row.name,
                row.type,
                _dims(row.kernel),
                _dims(row.stride),
                _dims(row.padding),
                _dims(row.output_shape),
                f"{row.params:,}",
                f"{row.macs:,}",
                "-" if row.receptive_field is None else str(row.receptive_field),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 6 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(f"input {_dims(anatomy.input_shape)} -> output {_dims(anatomy.output_shape)}")
    lines.append(f"receptive field of the last conv/pool layer: {anatomy.receptive_field}")
    lines.extend(f"warning: {w}" for w in anatomy.warnings)
    lines.append(f"total multiply-adds: {anatomy.total_macs:,}")
    lines.append(f"total parameters: {anatomy.total_params:,}")
    return "\n".join(lines)
