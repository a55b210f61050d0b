// Review app: vanilla JS, no network beyond this server. Text goes into the DOM only through textContent.
"use strict";
(function () {
  const cfg = JSON.parse(document.getElementById("config").textContent);
  const $ = (id) => document.getElementById(id);
  const PALETTE = ["#e6194b", "#d00000", "#f58231", "#ffb000", "#911eb4", "#42d4f4", "#8a8a8a", "#3cb44b",
                   "#f032e6", "#4363d8", "#9a6324", "#469990"];
  const colour = (c) => PALETTE[c % PALETTE.length];
  const state = { sort: "time", desc: false, show: "all", offset: 0, total: 0, items: [], pos: null, current: null,
                  detail: null, film: [], filmPos: 0, timeline: null, cls: "", found: null };

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function clock(sec) {
    if (sec === null || sec === undefined) return "";
    const s = Math.floor(sec), h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return `${h}:${String(m).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
  }
  function withToken(url) {
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(cfg.token);
  }
  async function api(url, body) {
    const opts = { headers: { "X-Token": cfg.token } };
    if (body !== undefined) {
      opts.method = "POST";
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(url, opts);
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return r.json();
  }
  function query(extra) {
    const p = new URLSearchParams({ sort: state.sort, desc: state.desc ? "1" : "0", show: state.show, ...extra });
    return p.toString();
  }

  // ---- progress
  function showProgress(p) {
    $("progress").textContent = `${p.reviewed} / ${p.total} reviewed (${p.confirmed} confirmed, ${p.rejected} rejected)`;
  }

  // ---- timeline
  async function loadTimeline(start, stop) {
    const range = start === undefined ? "" : `&start=${start}&stop=${stop}`;
    state.timeline = await api("/api/timeline?bins=1200" + range);
    const tl = state.timeline, whole = tl.start === 0 && tl.stop === cfg.frames;
    $("timeline-range").textContent = whole ? "whole recording (mouse wheel zooms)" :
      `frames ${tl.start}–${tl.stop - 1}` + (cfg.fps ? ` (${clock(tl.start / cfg.fps)}–${clock(tl.stop / cfg.fps)})` : "");
    $("timeline-reset").hidden = whole;
    drawTimeline();
  }
  let zoomTimer = null;
  function zoomTimeline(ev) {
    const tl = state.timeline;
    if (!tl) return;
    ev.preventDefault();
    const centre = frameAt(ev), span = tl.stop - tl.start;
    const next = Math.round(Math.min(cfg.frames, Math.max(100, span * (ev.deltaY > 0 ? 1.5 : 1 / 1.5))));
    let start = Math.round(centre - ((centre - tl.start) * next) / span);
    start = Math.max(0, Math.min(cfg.frames - next, start));
    state.timeline = { ...tl, start, stop: start + next };  // the pending range, until the server answers
    clearTimeout(zoomTimer);
    zoomTimer = setTimeout(() => loadTimeline(start, start + next), 120);
  }
  function timelineRows() {
    return cfg.classes.map((n, i) => i).filter((i) => i !== cfg.normal);
  }
  function drawTimeline() {
    const tl = state.timeline;
    if (!tl) return;
    const cv = $("timeline"), rows = timelineRows();
    const w = cv.clientWidth || 1000;
    const rowH = Math.max(6, Math.floor(100 / rows.length)), tickH = 14, failH = 3, foundH = state.found ? 6 : 0;
    cv.width = w;
    cv.height = rows.length * rowH + tickH + failH + 5 + (foundH ? foundH + 2 : 0);
    const g = cv.getContext("2d");
    g.fillStyle = "#111";
    g.fillRect(0, 0, cv.width, cv.height);
    const n = tl.probs.length, bw = w / n;
    rows.forEach((c, r) => {
      g.fillStyle = colour(c);
      for (let b = 0; b < n; b++) {
        const p = tl.probs[b][c];
        if (p < 0.1) continue;
        g.globalAlpha = Math.min(1, p);
        g.fillRect(b * bw, r * rowH, Math.max(1, bw), rowH - 1);
      }
    });
    g.globalAlpha = 1;
    const y = rows.length * rowH + 2;
    for (let b = 0; b < n; b++) {
      if (tl.ticks[b] < 0) continue;
      g.fillStyle = colour(tl.ticks[b]);
      g.fillRect(b * bw, y, Math.max(1, bw), tickH);
    }
    g.fillStyle = "#bbb";  // frames that failed to decode during the run
    for (let b = 0; b < n; b++) {
      if (tl.failed[b] > 0) g.fillRect(b * bw, y + tickH + 1, Math.max(1, bw), failH);
    }
    if (state.found) {  // annotated findings: green where an event caught them, red where none did
      const span = tl.stop - tl.start, fy = y + tickH + failH + 3;
      state.found.rows.forEach((r) => {
        if (r.end < tl.start || r.start >= tl.stop) return;
        const x0 = ((Math.max(r.start, tl.start) - tl.start) / span) * w;
        const x1 = ((Math.min(r.end + 1, tl.stop) - tl.start) / span) * w;
        g.fillStyle = r.caught ? "#5c5" : "#f44";
        g.fillRect(x0, fy, Math.max(2, x1 - x0), foundH);
      });
    }
    if (state.detail) {
      const d = state.detail, span = tl.stop - tl.start;
      const x0 = ((d.start - tl.start) / span) * w, x1 = ((d.end + 1 - tl.start) / span) * w;
      g.strokeStyle = "#fff";
      g.lineWidth = 2;
      g.strokeRect(x0 - 2, 0, Math.max(3, x1 - x0) + 4, cv.height);
    }
  }
  function frameAt(ev) {
    const cv = $("timeline"), tl = state.timeline, r = cv.getBoundingClientRect();
    return Math.floor(tl.start + ((ev.clientX - r.left) / r.width) * (tl.stop - tl.start));
  }
  function hoverTimeline(ev) {
    if (!state.timeline) return;
    const f = frameAt(ev);
    $("timeline-hover").textContent = `frame ${f}` + (cfg.fps ? ` · ${clock(f / cfg.fps)}` : "");
  }
  async function clickTimeline(ev) {
    if (!state.timeline) return;
    const r = await api("/api/locate?" + query({ frame: frameAt(ev) }));
    if (r.id !== null) await select(r.id, r.pos);
  }

  // ---- event list
  async function loadPage(offset) {
    const r = await api("/api/events?" + query({ offset: Math.max(0, offset), limit: cfg.page_size }));
    state.offset = r.offset;
    state.total = r.total;
    state.items = r.items;
    showProgress(r.progress);
    renderList();
  }
  function renderList() {
    const ol = $("events");
    ol.replaceChildren();
    state.items.forEach((it, k) => {
      const li = el("li", null, "event-item");
      li.dataset.id = it.id;
      const d = it.decision;
      const verdict = d && d.verdict ? d.verdict : "unreviewed";
      li.classList.add(verdict);
      if (state.current === it.id) li.classList.add("selected");
      if (Array.isArray(it.on)) {
        li.classList.add(it.on.length ? "on-finding" : "no-finding");
        li.title = it.on.length ? `on finding ${it.on.join(", ")}` : "on no annotated finding";
      }
      const sw = el("span", null, "swatch");
      sw.style.background = colour(d && d.cls !== null ? d.cls : it.cls);
      li.append(sw, el("span", `#${it.id}`, "id"), el("span", clock(it.time), "time"),
        el("span", d && d.cls !== null && d.cls !== it.cls ? cfg.classes[d.cls] + " (was " + it.class + ")" : it.class, "cls"),
        el("span", it.peak_score.toFixed(3), "score"), el("span", verdict === "unreviewed" ? "·" : verdict, "verdict"));
      li.addEventListener("click", () => select(it.id, state.offset + k));
      ol.append(li);
    });
    const pages = Math.max(1, Math.ceil(state.total / cfg.page_size));
    $("page-info").textContent = `page ${Math.floor(state.offset / cfg.page_size) + 1} / ${pages} · ${state.total} events`;
  }

  // ---- event view
  async function select(id, pos) {
    if (pos === undefined || pos === null) {
      const r = await api("/api/locate?" + query({ id }));
      pos = r.pos;
    }
    state.current = id;
    state.pos = pos;
    if (pos !== null && (pos < state.offset || pos >= state.offset + cfg.page_size)) {
      await loadPage(Math.floor(pos / cfg.page_size) * cfg.page_size);
    } else {
      renderList();
    }
    const d = await api(`/api/events/${id}`);
    state.detail = d;
    renderEvent(d);
    drawTimeline();
    const li = document.querySelector(`li[data-id="${id}"]`);
    if (li) li.scrollIntoView({ block: "nearest" });
  }
  function imgUrl(frame) {
    return withToken(cfg.video ? `/frame/${frame}` : `/thumb/${frame}`);
  }
  function filmFrames(d) {
    if (!cfg.video) return d.thumb_frames.length ? d.thumb_frames : [d.peak_frame];
    const n = Math.min(12, d.end - d.start + 1), out = new Set([d.peak_frame]);
    for (let k = 0; k < n; k++) out.add(d.start + Math.round((k * (d.end - d.start)) / Math.max(1, n - 1)));
    return [...out].sort((a, b) => a - b);
  }
  function renderEvent(d) {
    $("empty").hidden = true;
    $("event").hidden = false;
    const also = (d.classes || []).slice(1);
    $("ev-title").textContent = `Event #${d.id} · ${d.class}` + (also.length ? ` (also ${also.join(", ")})` : "") +
      ` · frames ${d.start}–${d.end}` +
      (d.time === null ? "" : ` · ${clock(d.time)}`) + (d.peak_file ? ` · peak file ${d.peak_file}` : "") + " · " +
      `peak ${d.peak_score.toFixed(3)} · ${d.n_flagged} flagged` +
      (Array.isArray(d.on) ? (d.on.length ? ` · on finding ${d.on.join(", ")}` : " · on no annotated finding") : "");
    state.film = filmFrames(d);
    state.filmPos = Math.max(0, state.film.indexOf(d.peak_frame));
    showFilm();
    const strip = $("filmstrip");
    strip.replaceChildren();
    state.film.forEach((f, k) => {
      const im = el("img", null, "film");
      im.alt = `frame ${f}`;
      im.title = `frame ${f}`;
      im.loading = "lazy";
      im.addEventListener("error", () => im.classList.add("missing"));
      im.src = imgUrl(f);
      im.addEventListener("click", () => { state.filmPos = k; showFilm(); });
      strip.append(im);
    });
    const t = $("probs");
    t.replaceChildren();
    d.peak_probs.map((p, c) => [p, c]).sort((a, b) => b[0] - a[0]).forEach(([p, c]) => {
      const tr = el("tr");
      const bar = el("div", null, "bar");
      bar.style.width = `${Math.round(p * 100)}%`;
      bar.style.background = colour(c);
      const td = el("td");
      td.append(bar);
      tr.append(el("td", cfg.classes[c]), td, el("td", p.toFixed(3)));
      t.append(tr);
    });
    drawContext(d);
    const nb = $("neighbours");
    nb.replaceChildren();
    [["previous", d.prev], ["next", d.next]].forEach(([what, id]) => {
      if (id === null) return;
      const b = el("button", `${what} in time: #${id}`);
      b.type = "button";
      b.addEventListener("click", () => select(id));
      nb.append(b);
    });
    const dec = d.decision;
    $("cls").value = dec && dec.cls !== null ? String(dec.cls) : "";
    $("comment").value = dec ? dec.comment : "";
    showDecision(dec);
  }
  function showFilm() {
    const f = state.film[state.filmPos];
    $("peak").classList.remove("missing");
    $("peak").src = imgUrl(f);
    const file = (state.detail.files || {})[String(f)];
    $("peak-caption").textContent = `frame ${f}` + (f === state.detail.peak_frame ? " (peak)" : "") +
      (file ? ` · ${file}` : "") +
      ` · ${state.filmPos + 1}/${state.film.length}` + (cfg.video ? " · from the recording" : " · stored thumbnail");
    document.querySelectorAll("#filmstrip img").forEach((im, k) => im.classList.toggle("on", k === state.filmPos));
  }
  function drawContext(d) {
    const cv = $("context"), g = cv.getContext("2d"), ctx = d.context;
    g.fillStyle = "#111";
    g.fillRect(0, 0, cv.width, cv.height);
    const n = ctx.probs.length, span = ctx.stop - ctx.start;
    const x = (f) => ((f - ctx.start) / span) * cv.width;
    g.fillStyle = "rgba(255,255,255,0.15)";
    g.fillRect(x(d.start), 0, Math.max(2, x(d.end + 1) - x(d.start)), cv.height);
    cfg.classes.forEach((name, c) => {
      if (c === cfg.normal) return;
      g.strokeStyle = colour(c);
      g.lineWidth = c === d.cls ? 2 : 1;
      g.beginPath();
      for (let k = 0; k < n; k++) {
        const px = x(ctx.start + k * ctx.step), py = cv.height - 4 - ctx.probs[k][c] * (cv.height - 8);
        if (k) g.lineTo(px, py); else g.moveTo(px, py);
      }
      g.stroke();
    });
  }
  function showDecision(dec) {
    const box = $("current-decision");
    box.replaceChildren();
    if (!dec) { box.append(el("span", "not reviewed", "unreviewed")); return; }
    box.append(el("span", dec.verdict || "no verdict", dec.verdict || "unreviewed"),
      el("span", dec.cls !== null ? ` · class ${cfg.classes[dec.cls]}` : ""),
      el("span", ` · ${dec.reviewer || "anonymous"} · ${dec.time}`),
      el("q", dec.comment || ""));
  }

  // ---- decisions
  async function decide(verdict) {
    const d = state.detail;
    if (!d) return;
    const prev = d.decision;
    const body = { verdict: verdict === undefined ? (prev ? prev.verdict : "") : verdict,
                   cls: $("cls").value === "" ? null : Number($("cls").value),
                   comment: $("comment").value, reviewer: $("reviewer").value };
    try {
      const r = await api(`/api/events/${d.id}/decision`, body);
      d.decision = r.decision;
      showDecision(r.decision);
      showProgress(r.progress);
      $("status").textContent = "saved";
      const it = state.items.find((i) => i.id === d.id);
      if (it) { it.decision = r.decision; renderList(); }
      if (verdict && $("advance").checked) await move(1);
    } catch (e) {
      $("status").textContent = "not saved: " + e.message;
    }
  }
  async function move(step) {
    if (state.total === 0) return;
    let pos = state.pos === null ? (step > 0 ? 0 : state.total - 1) : state.pos + step;
    if (pos < 0 || pos >= state.total) return;
    if (pos < state.offset || pos >= state.offset + state.items.length) {
      await loadPage(Math.floor(pos / cfg.page_size) * cfg.page_size);
    }
    const it = state.items[pos - state.offset];
    if (it) await select(it.id, pos);
  }
  async function nextUnreviewed() {
    const r = await api("/api/events?" + new URLSearchParams({ sort: state.sort, desc: state.desc ? "1" : "0",
      show: "unreviewed", limit: 1 }));
    if (r.items.length) await select(r.items[0].id);
  }

  // ---- what was caught (the app was started with --findings)
  async function loadFindings() {
    const r = await api("/api/summary");
    const f = r.findings;
    state.found = f;
    if (!f) return;
    $("findings-box").hidden = false;
    const ci = f.sensitivity_ci ? ` (95% CI ${Math.round(100 * f.sensitivity_ci[0])}–${Math.round(100 * f.sensitivity_ci[1])} %)` : "";
    $("findings-summary").textContent = `${f.file}: ${f.caught} of ${f.findings} findings caught${ci}, ` +
      `${f.caught_class} with the right class · ${f.false_events} of ${f.events} events on no annotated finding` +
      (f.false_alerts_per_hour !== null ? ` (${f.false_alerts_per_hour.toFixed(1)} per hour)` : "");
    const ol = $("findings");
    ol.replaceChildren();
    f.rows.forEach((row) => {
      const li = el("li", `${row.finding} · ${row.cls} · ${row.start}–${row.end} · ` + (row.caught ?
        `caught +${row.delay_frames} frames` + (row.delay_s !== null ? ` (${row.delay_s.toFixed(1)} s)` : "") : "missed"),
        row.caught ? "caught" : "missed");
      li.dataset.finding = row.finding;
      li.addEventListener("click", () => {
        if (row.events.length) select(row.events[0]);
        else {  // nothing to open: show the finding's stretch of the recording
          const pad = Math.max(50, row.end - row.start);
          loadTimeline(Math.max(0, row.start - pad), Math.min(cfg.frames, row.end + 1 + pad));
        }
      });
      ol.append(li);
    });
    drawTimeline();
  }

  function onKey(ev) {
    const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
    if (typing) {
      if (ev.key === "Escape") document.activeElement.blur();
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey) && document.activeElement.id === "comment") {
        ev.preventDefault();
        decide();
      }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key;
    let handled = true;
    if (k === "j" || k === "ArrowDown") move(1);
    else if (k === "k" || k === "ArrowUp") move(-1);
    else if (k === "u") nextUnreviewed();
    else if (k === "c") decide("confirm");
    else if (k === "x" || k === "r") decide("reject");
    else if (k === "e") $("comment").focus();
    else if (k === "-") { $("cls").value = ""; decide(); }
    else if (/^[0-9]$/.test(k)) {
      const c = k === "0" ? 9 : Number(k) - 1;
      if (c < cfg.classes.length) { $("cls").value = String(c); decide(); }
    } else if (k === "ArrowRight" && state.detail) { state.filmPos = Math.min(state.film.length - 1, state.filmPos + 1); showFilm(); }
    else if (k === "ArrowLeft" && state.detail) { state.filmPos = Math.max(0, state.filmPos - 1); showFilm(); }
    else handled = false;
    if (handled) ev.preventDefault();
  }

  function init() {
    $("peak").addEventListener("error", () => {
      $("peak").classList.add("missing");
      $("peak-caption").textContent += " · no stored thumbnail for this frame (start the app with --video)";
    });
    const sel = $("cls");
    sel.append(new Option("(keep detected class)", ""));
    cfg.classes.forEach((n, c) => sel.append(new Option(`${(c + 1) % 10} ${n}`, String(c))));
    $("reviewer").value = localStorage.getItem("capsule-reviewer") || cfg.reviewer || "";
    $("reviewer").addEventListener("change", () => localStorage.setItem("capsule-reviewer", $("reviewer").value));
    $("confirm").addEventListener("click", () => decide("confirm"));
    $("reject").addEventListener("click", () => decide("reject"));
    $("save").addEventListener("click", () => decide());
    $("cls").addEventListener("change", () => decide());
    ["sort", "show"].forEach((id) => $(id).addEventListener("change", () => {
      state[id] = $(id).value; state.pos = null; loadPage(0);
    }));
    $("desc").addEventListener("change", () => { state.desc = $("desc").checked; state.pos = null; loadPage(0); });
    $("page-prev").addEventListener("click", () => loadPage(state.offset - cfg.page_size));
    $("page-next").addEventListener("click", () => {
      if (state.offset + cfg.page_size < state.total) loadPage(state.offset + cfg.page_size);
    });
    $("timeline").addEventListener("mousemove", hoverTimeline);
    $("timeline").addEventListener("click", clickTimeline);
    $("timeline").addEventListener("wheel", zoomTimeline, { passive: false });
    $("timeline-reset").addEventListener("click", () => loadTimeline());
    window.addEventListener("resize", drawTimeline);
    document.addEventListener("keydown", onKey);
    Promise.all([loadTimeline(), loadPage(0), cfg.findings ? loadFindings() : null])
      .then(() => { document.body.dataset.ready = "1"; });
  }
  init();
})();
