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
// Fills `cell` with a chip per consumer group (name · consumers · lag), `title(g)` its
// tooltip; `extra(chip, g)`, if given, adds to it.
function renderGroupChips(cell, groups, title, extra) {
  cell.replaceChildren();
  if (!groups.length) { cell.appendChild(el("span", "none", "no consumer group")); return; }
  const chips = el("div", "chips");
  for (const g of groups) {
    const chip = el("span", "chip");
    chip.dataset.group = g.name;
    chip.appendChild(el("b", "", g.name));
    chip.appendChild(document.createTextNode("· " + g.consumers + " ·"));
    chip.appendChild(el("span", "lag", "lag " + fmtInt(g.lag)));
    chip.title = title(g);
    if (extra) extra(chip, g);
    chips.appendChild(chip);
  }
  cell.appendChild(chips);
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
