// The browser SSH terminal: xterm.js <-> websocket /ws/ssh/{target}.
// Binary frames carry terminal bytes both ways; resizes go up as small JSON text frames.
// The gateway speaks SSH to the target and relays its prompts; nothing is kept here.
import "./csp-styles.js";
import { Terminal } from "/static/vendor/xterm/xterm.mjs";
import { FitAddon } from "/static/vendor/xterm/addon-fit.mjs";

const root = document.getElementById("terminal");
const status = document.getElementById("terminal-status");

function setStatus(state, text) {
  status.dataset.state = state;
  status.textContent = text;
  document.body.dataset.terminal = state;
}

const term = new Terminal({
  cursorBlink: true,
  fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
  fontSize: 14,
  scrollback: 5000,
  theme: { background: "#0b1020" },
});
const fit = new FitAddon();
term.loadAddon(fit);
term.open(root);
fit.fit();
// For people debugging in the console (and for the browser tests).
window.domumTerminal = term;

const url = new URL(root.dataset.socket, window.location.href);
url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
const socket = new WebSocket(url);
socket.binaryType = "arraybuffer";
const encoder = new TextEncoder();

function sendSize() {
  if (socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  }
}

socket.addEventListener("open", () => {
  setStatus("open", "connected");
  sendSize();
  term.focus();
});

socket.addEventListener("message", (event) => {
  if (typeof event.data !== "string") term.write(new Uint8Array(event.data));
});

socket.addEventListener("close", (event) => {
  const reason = event.reason || (event.code === 1000 ? "session ended" : "connection lost");
  setStatus("closed", `closed: ${reason}`);
  root.dataset.closeCode = String(event.code);
  root.dataset.closeReason = event.reason;
  term.options.disableStdin = true;
  term.options.cursorBlink = false;
});

term.onData((data) => {
  if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data));
});

term.onBinary((data) => {
  if (socket.readyState !== WebSocket.OPEN) return;
  const bytes = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
  socket.send(bytes);
});

term.onResize(sendSize);

let pending = 0;
new ResizeObserver(() => {
  cancelAnimationFrame(pending);
  pending = requestAnimationFrame(() => fit.fit());
}).observe(root);
