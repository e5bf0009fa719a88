// The drawing pad: black ink on white paper, by pointer (mouse, pen, finger) or keyboard.
// The digits models invert dark-on-light images themselves, so the drawing is sent as it looks.

const INK = "#111";
const PAPER = "#fff";
const STEP = 10; // pixels per arrow key press (Shift: 2)

export class DrawingPad {
  constructor(canvas, overlay, onStroke) {
    this.canvas = canvas;
    this.overlay = overlay;
    this.onStroke = onStroke; // called when a stroke ends, to classify what is drawn
    this.context = canvas.getContext("2d");
    this.drawing = false;
    this.last = null;
    this.pen = { x: canvas.width / 2, y: canvas.height / 2, down: false };
    this.inked = false;
    this.clear();
    canvas.addEventListener("pointerdown", (event) => this.start(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    canvas.addEventListener("pointerup", (event) => this.end(event));
    canvas.addEventListener("pointercancel", (event) => this.end(event));
    canvas.addEventListener("keydown", (event) => this.key(event));
    canvas.addEventListener("focus", () => this.showPen());
    canvas.addEventListener("blur", () => this.hidePen());
  }

  clear() {
    this.context.fillStyle = PAPER;
    this.context.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.context.lineWidth = this.canvas.width / 12;
    this.context.lineCap = "round";
    this.context.lineJoin = "round";
    this.context.strokeStyle = INK;
    this.inked = false;
  }

  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * this.canvas.width) / box.width,
      y: ((event.clientY - box.top) * this.canvas.height) / box.height,
    };
  }

  line(from, to) {
    this.context.beginPath();
    this.context.moveTo(from.x, from.y);
    this.context.lineTo(to.x + 0.01, to.y); // a zero-length line draws no dot
    this.context.stroke();
    this.inked = true;
  }

  start(event) {
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.drawing = true;
    this.last = this.point(event);
    this.line(this.last, this.last);
  }

  move(event) {
    if (!this.drawing) {
      return;
    }
    const next = this.point(event);
    this.line(this.last, next);
    this.last = next;
  }

  end(event) {
    if (!this.drawing) {
      return;
    }
    this.drawing = false;
    if (this.canvas.hasPointerCapture(event.pointerId)) {
      this.canvas.releasePointerCapture(event.pointerId);
    }
    this.onStroke();
  }

  key(event) {
    const step = event.shiftKey ? 2 : STEP;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (event.key in moves) {
      event.preventDefault();
      const [dx, dy] = moves[event.key];
      const from = { x: this.pen.x, y: this.pen.y };
      this.pen.x = Math.min(Math.max(this.pen.x + dx, 0), this.canvas.width);
      this.pen.y = Math.min(Math.max(this.pen.y + dy, 0), this.canvas.height);
      if (this.pen.down) {
        this.line(from, this.pen);
      }
    } else if (event.key === " ") {
      event.preventDefault();
      this.pen.down = !this.pen.down;
      if (this.pen.down) {
        this.line(this.pen, this.pen);
      } else {
        this.onStroke();
      }
    } else if (event.key === "Enter") {
      event.preventDefault();
      this.onStroke();
    } else {
      return;
    }
    this.showPen();
  }

  showPen() {
    const context = this.overlay.getContext("2d");
    context.clearRect(0, 0, this.overlay.width, this.overlay.height);
    context.strokeStyle = this.pen.down ? "#d22" : "#27c";
    context.lineWidth = 2;
    context.beginPath();
    context.arc(this.pen.x, this.pen.y, this.canvas.width / 24, 0, 2 * Math.PI);
    context.stroke();
    const state = this.pen.down ? "down" : "up";
    this.canvas.setAttribute(
      "aria-label",
      `Drawing pad, pen ${state} at ${Math.round(this.pen.x)}, ${Math.round(this.pen.y)}`,
    );
  }

  hidePen() {
    const context = this.overlay.getContext("2d");
    context.clearRect(0, 0, this.overlay.width, this.overlay.height);
  }

  toBlob() {
    return new Promise((resolve) => this.canvas.toBlob(resolve, "image/png"));
  }
}
