"""The rows `convserve predict` writes, one per input file, in input order: CSV with the top-k
flattened into columns, or JSON lines with the top-k as the list /predict answers. The rows
go to stdout or -o FILE; the progress bar and a line per failed file go to stderr."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

from tqdm import tqdm

from service.api.schemas import Prediction
from service.errors import CommandError
from service.inference import Route

FORMATS = ("csv", "jsonl")
JSON_LINES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class Outcome:
    """One input file's row: its top-k, or why it has none."""

    path: str  # as the user named it: the argument, joined with the path inside a folder
    model: str
    version: int
    predictions: list[Prediction]
    heatmap: str | None = None  # the overlay PNG written, with --heatmap
    error: str | None = None  # None: classified


def chosen_format(given: str | None, output: Path | None) -> str:
    """--format when given; else jsonl for an -o file named .jsonl or .ndjson, csv otherwise."""
    if given is not None:
        return given
    if output is not None and output.suffix.lower() in JSON_LINES:
        return "jsonl"
    return "csv"


def csv_header(top_k: int, heatmap: bool) -> list[str]:
    """path, model, version, label_1, class_index_1, probability_1, ..., [heatmap,] error."""
    ranks = [
        f"{field}_{rank}"
        for rank in range(1, top_k + 1)
        for field in ("label", "class_index", "probability")
    ]
    return ["path", "model", "version", *ranks, *(["heatmap"] if heatmap else []), "error"]


def row_writer(
    kind: str, stream: TextIO, top_k: int, *, heatmap: bool
) -> Callable[[Outcome], None]:
    """A function that writes one row to `stream` (the CSV header first); `top_k` is the count
    each classified row has (the request's, clipped to the class count)."""
    if kind == "jsonl":

        def write_json(outcome: Outcome) -> None:
            line: dict[str, object] = {
                "path": outcome.path,
                "model": outcome.model,
                "version": outcome.version,
                "predictions": [
                    {"label": p.label, "class_index": p.class_index, "probability": p.probability}
                    for p in outcome.predictions
                ],
            }
            if heatmap:
                line["heatmap"] = outcome.heatmap
            line["error"] = outcome.error
            stream.write(json.dumps(line, ensure_ascii=False) + "\n")

        return write_json
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(csv_header(top_k, heatmap))

    def write_csv(outcome: Outcome) -> None:
        cells: list[object] = [outcome.path, outcome.model, outcome.version]
        for rank in range(top_k):
            if rank < len(outcome.predictions):
                p = outcome.predictions[rank]
                cells += [p.label, p.class_index, repr(p.probability)]
            else:
                cells += ["", "", ""]
        if heatmap:
            cells.append(outcome.heatmap or "")
        cells.append(outcome.error or "")
        writer.writerow(cells)

    return write_csv


class Report:
    """One run's output: the rows (-o FILE, opened only once the model has loaded, so a run
    that cannot start leaves an earlier file as it was; else stdout), a progress bar on
    stderr (on a terminal) and a line on stderr per file that failed."""

    def __init__(self, output: Path | None, kind: str | None, top_k: int, *, heatmap: bool):
        self.output = output
        self.kind = chosen_format(kind, output)
        self.top_k = top_k
        self.heatmap = heatmap
        self.stream: TextIO | None = None
        self.bar: tqdm[NoReturn] | None = None  # a bar with no iterable of its own
        if output is not None:  # refused now, not after the model has loaded
            where = output if output.exists() else output.absolute().parent
            if not os.access(where, os.W_OK):
                raise CommandError(f"cannot write {output}: {where} is not writable")

    def open(self, route: Route, files: int) -> Callable[[Outcome], None]:
        """The function that writes each row; the model is loaded and the run begins."""
        if self.output is None:
            self.stream = sys.stdout
            if isinstance(sys.stdout, io.TextIOWrapper):  # names that are not UTF-8 as they are
                sys.stdout.reconfigure(errors="surrogateescape")
        else:
            self.stream = self.output.open(
                "w", encoding="utf-8", errors="surrogateescape", newline=""
            )
        top_k = min(self.top_k, len(route.labels))
        write = row_writer(self.kind, self.stream, top_k, heatmap=self.heatmap)
        self.bar = tqdm(total=files, desc=f"{route.name} v{route.version}", unit="file",
                        file=sys.stderr, disable=None, dynamic_ncols=True)  # fmt: skip

        def write_row(outcome: Outcome) -> None:
            write(outcome)
            if outcome.error is not None:
                tqdm.write(f"convserve predict: {outcome.path}: {outcome.error}", file=sys.stderr)

        return write_row

    def done(self, outcome: Outcome) -> None:
        """One file finished (rows may wait for an earlier one)."""
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.stream is not None:
            self.stream.flush()
            if self.stream is not sys.stdout:
                self.stream.close()
