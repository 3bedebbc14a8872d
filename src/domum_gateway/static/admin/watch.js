// Live watch (admin console): a read-only xterm.js view of a user's browser SSH terminal.
// The websocket /api/v1/sessions/{id}/watch sends the terminal's size as JSON text frames
// and its output as binary frames. Nothing is sent back and nothing is kept here.
import "./csp-styles.js";
import { Terminal } from "./xterm.mjs";

const root = document.getElementById("watch-terminal");
const status = document.getElementById("watch-status");

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
  document.body.dataset.watch = state;
}

const term = new Terminal({
  cols: 80,
  rows: 24,
  disableStdin: true,
  cursorBlink: false,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
  fontSize: 14,
  scrollback: 5000,
  theme: { background: "#0b1020" },
});
term.open(root);
// For people debugging in the console (and for the browser tests).
window.domumWatch = term;

const url = new URL(root.dataset.socket, window.location.href);
url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
const socket = new WebSocket(url);
socket.binaryType = "arraybuffer";

socket.addEventListener("open", () => setStatus("open", "watching (read-only)"));

socket.addEventListener("message", (event) => {
  if (typeof event.data !== "string") {
    term.write(new Uint8Array(event.data));
    return;
  }
  let message;
  try {
    message = JSON.parse(event.data);
  } catch {
    return;
  }
  const { type, cols, rows } = message || {};
  if (type === "size" && Number.isInteger(cols) && Number.isInteger(rows)
      && cols > 0 && cols <= 1000 && rows > 0 && rows <= 1000) {
    term.resize(cols, rows);
  }
});

socket.addEventListener("close", (event) => {
  const reason = event.reason || (event.code === 1000 ? "the session ended" : "connection lost");
  setStatus("closed", `stopped: ${reason}`);
  root.dataset.closeCode = String(event.code);
  root.dataset.closeReason = event.reason;
});
