// The helpers every qbus monitor page shares (spliced in by qbus_server_kit::page).
const REFRESH_MS = 1000;
const $ = (id) => document.getElementById(id);
const intFmt = new Intl.NumberFormat("en-US");
function fmtInt(n) { return intFmt.format(n); }
function fmtDuration(ms) {
  const s = Math.floor(ms / 1000), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60);
  if (d) return d + "d " + h + "h";
  if (h) return h + "h " + m + "m";
  if (m) return m + "m " + (s % 60) + "s";
  return s + "s";
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
// Marks the header's live indicator up or down.
function setLive(up, text) {
  $("live").classList.toggle("down", !up);
  $("live-text").textContent = text;
}
// Calls `refresh` now and then every REFRESH_MS after it finishes.
async function refreshForever(refresh) {
  for (;;) {
    await refresh();
    await new Promise((done) => setTimeout(done, REFRESH_MS));
  }
}
