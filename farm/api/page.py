"""The dashboard's pages: inline CSS and JS, nothing fetched from elsewhere.

The front page follows `/api/overview/events` (server-sent events: the overview whenever it
changes) instead of polling; `/?job=<id>` follows the job's own `/v1/jobs/<id>/events` (state,
step progress, previews) and reads `/api/job/<id>` when its state changes; `/?batch=<name>`
reads `/api/batch/<name>` (its failed jobs and their reasons) when the overview changes. At
most one request is in flight: a change that comes during one is read once it is done. The
page is rebuilt only when the answer changed (so images are not reloaded for nothing), with
DOM calls and `textContent` only, never `innerHTML`, so a prompt, a batch name or an error
message is shown as text and can never run as markup. `LOGIN` is the login form.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>render-farm</title>
<style>
  :root { --bg:#f4f5f7; --card:#fff; --ink:#1d2330; --mute:#6b7385; --line:#dde1e8;
          --ok:#2e9e5b; --run:#2f6fdf; --wait:#c9a227; --bad:#d24b3e; --off:#9aa1ad; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, sans-serif; background:var(--bg); color:var(--ink); }
  header { background:#1d2330; color:#fff; padding:10px 20px; display:flex; gap:16px;
           align-items:baseline; }
  header h1 { font-size:18px; margin:0; }
  header a { color:#fff; text-decoration:none; }
  header .mute { color:#b8bfcc; }
  main { padding:16px 20px; display:grid; gap:16px;
         grid-template-columns: minmax(280px, 1fr) minmax(280px, 2fr); }
  section { background:var(--card); border:1px solid var(--line); border-radius:6px;
            padding:12px 14px; }
  section.wide { grid-column: 1 / -1; }
  h2 { font-size:13px; text-transform:uppercase; letter-spacing:.06em; color:var(--mute);
       margin:0 0 8px; }
  table { border-collapse:collapse; width:100%; }
  td, th { text-align:left; padding:3px 6px; border-bottom:1px solid var(--line); }
  th { color:var(--mute); font-weight:600; }
  .mono { font-family: ui-monospace, monospace; font-size:12px; }
  .mute { color:var(--mute); }
  .num { text-align:right; font-variant-numeric:tabular-nums; }
  .pill { display:inline-block; padding:0 7px; border-radius:9px; color:#fff; font-size:12px; }
  .succeeded { background:var(--ok); } .running { background:var(--run); }
  .queued, .waiting { background:var(--wait); } .failed { background:var(--bad); }
  .cancelled, .expired, .offline, .unsubmitted { background:var(--off); }
  .online { background:var(--ok); }
  .bar { display:flex; height:12px; background:#e8ebf0; border-radius:6px; overflow:hidden;
         min-width:160px; }
  .bar span { display:block; height:100%; }
  .jobs { display:grid; grid-template-columns:repeat(auto-fill, minmax(150px, 1fr)); gap:10px; }
  .job { display:block; border:1px solid var(--line); border-radius:6px; padding:6px;
         color:inherit; text-decoration:none; background:#fafbfc; }
  .job:hover { border-color:var(--run); }
  .thumb { width:100%; aspect-ratio:1; object-fit:contain; background:#e8ebf0;
           image-rendering:pixelated; display:block; border-radius:4px; }
  .nothumb { display:flex; align-items:center; justify-content:center; color:var(--mute); }
  .job .id { font-family:ui-monospace, monospace; font-size:10px; word-break:break-all; }
  .side { display:grid; grid-template-columns:repeat(auto-fill, minmax(220px, 1fr)); gap:14px; }
  .side figure { margin:0; }
  .side figcaption { color:var(--mute); font-size:12px; margin-top:4px; }
  .side img { width:100%; image-rendering:pixelated; background:#e8ebf0; border-radius:4px; }
  dl { display:grid; grid-template-columns:max-content 1fr; gap:2px 12px; margin:0; }
  dt { color:var(--mute); }
  dd { margin:0; word-break:break-all; }
  .error { color:var(--bad); }
</style>
</head>
<body>
<header><h1><a href="/">render-farm</a></h1><span class="mute" id="storage"></span>
<span class="mute" id="updated"></span></header>
<main id="main"><section class="wide">Loading…</section></main>
<!--INITIAL-->
<script>
"use strict";
const STATES = ["succeeded", "running", "queued", "waiting", "failed", "cancelled",
                "unsubmitted", "expired"];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined)
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function pill(state) { return el("span", {class: "pill " + state, text: state}); }
function ago(t, now) {
  if (!t) return "";
  const s = Math.max(0, Math.round(now - t));
  return s < 90 ? s + "s ago" : s < 5400 ? Math.round(s / 60) + "m ago"
                                         : Math.round(s / 3600) + "h ago";
}
function table(head, rows) {
  return el("table", {}, el("tr", {}, ...head.map(h => el("th", {text: h}))), ...rows);
}
function section(title, cls, ...body) {
  return el("section", {class: cls || null, id: title.toLowerCase().replace(/ /g, "-")},
            el("h2", {text: title}), ...body);
}
function bar(counts, total) {
  const b = el("div", {class: "bar"});
  for (const s of STATES) {
    const n = counts[s] || 0;
    if (n && total) b.append(el("span", {class: s, style: `width:${100 * n / total}%`,
                                         title: `${s} ${n}`}));
  }
  return b;
}

function queues(data) {
  return section("Queues", null, table(["queue", "waiting"], data.queues.map(q =>
    el("tr", {"data-queue": q.name}, el("td", {class: "mono", text: q.name}),
       el("td", {class: "num", text: q.depth})))));
}
function workers(data) {
  if (!data.workers.length) return section("Workers", null, el("p", {class: "mute",
    text: "No worker has reported in."}));
  return section("Workers", null, table(["worker", "device", "", "job", "done", "warm models",
                                         "heartbeat"],
    data.workers.map(w => el("tr", {"data-worker": w.name},
      el("td", {class: "mono", text: w.name}), el("td", {text: w.device}),
      el("td", {}, pill(w.online ? "online" : "offline")),
      el("td", {class: "mono"}, w.job ? el("a", {href: "/?job=" + encodeURIComponent(w.job),
                                                 text: w.job.slice(0, 8)}) : "idle"),
      el("td", {class: "num", text: w.jobs_done}),
      el("td", {class: "mono", text: w.models.join(", ")}),
      el("td", {class: "mute", text: ago(w.heartbeat, data.now)})))));
}
function batches(data) {
  if (!data.batches.length) return section("Batches", "wide", el("p", {class: "mute",
    text: "No batches."}));
  return section("Batches", "wide", table(["batch", "progress", "jobs", "", "images",
                                           "img/s", "ETA"],
    data.batches.map(b => el("tr", {"data-batch": b.name},
      el("td", {class: "mono"}, el("a", {href: "/?batch=" + encodeURIComponent(b.name),
                                          text: b.name})), el("td", {}, bar(b.counts, b.total)),
      el("td", {class: "num", text: `${b.ended}/${b.total}`}),
      el("td", {class: "mute", text: STATES.filter(s => b.counts[s])
                                          .map(s => `${s} ${b.counts[s]}`).join("  ")}),
      el("td", {class: "num", text: `${b.images_done}/${b.images_total}`}),
      el("td", {class: "num", text: b.rate ? b.rate.toFixed(2) : ""}),
      el("td", {class: "num", text: b.eta ? Math.round(b.eta) + "s" : ""})))));
}
function jobCard(j, now) {
  const img = j.thumb ? el("img", {class: "thumb", src: j.thumb, alt: "output of " + j.id})
                      : el("div", {class: "thumb nothumb", text: j.state});
  const step = j.state === "running" && j.progress.total
    ? ` ${j.progress.step}/${j.progress.total}` : "";
  return el("a", {class: "job", href: "/?job=" + encodeURIComponent(j.id), "data-job": j.id},
    img, el("div", {}, pill(j.state), " ", el("span", {class: "mute", text: j.kind + step})),
    el("div", {class: "id", text: j.id}),
    el("div", {class: "mute", text: (j.prompt || "") + " · " + ago(j.created_at, now)}));
}
function recent(data) {
  return section("Recent jobs", "wide", data.jobs.length
    ? el("div", {class: "jobs"}, ...data.jobs.map(j => jobCard(j, data.now)))
    : el("p", {class: "mute", text: "No jobs yet."}));
}

function figure(caption, url) {
  const shown = !url ? el("div", {class: "thumb nothumb", text: "none"})
    : /\.(png|jpe?g|webp)$/i.test(url.split("?")[0]) ? el("img", {src: url, alt: caption})
    : el("a", {href: url, class: "thumb nothumb mono",
               text: decodeURIComponent(url.split("?")[0].split("/").pop())});
  return el("figure", {}, shown, el("figcaption", {text: caption}));
}
function jobPage(j) {
  const fields = [["job", j.id], ["state", j.state], ["kind", j.kind], ["model", j.model],
    ["prompt", j.prompt], ["negative prompt", j.spec.negative_prompt], ["seed", j.spec.seed],
    ["steps", j.spec.num_inference_steps], ["scheduler", j.spec.scheduler],
    ["guidance", j.spec.guidance_scale], ["strength", j.spec.strength],
    ["worker", j.worker], ["attempt", j.attempt], ["error", j.error]];
  const dl = el("dl", {});
  for (const [k, v] of fields) if (v !== null && v !== undefined && v !== "")
    dl.append(el("dt", {text: k}), el("dd", {class: k === "error" ? "error" : null, text: v}));
  const imgs = j.images;
  return [section("Job", "wide", dl),
          section("Input, mask and outputs", "wide", el("div", {class: "side"},
            figure("input", imgs.image), figure("mask", imgs.mask),
            ...(imgs.outputs.length ? imgs.outputs.map((u, i) => figure("output " + i, u))
                                    : [figure("output", null)])))];
}

function batchPage(b) {
  const dl = el("dl", {});
  for (const [k, v] of [["batch", b.name], ["jobs", `${b.ended}/${b.total}`],
      ["images", `${b.images_done}/${b.images_total}`],
      ["img/s", b.rate ? b.rate.toFixed(2) : ""], ["ETA", b.eta ? Math.round(b.eta) + "s" : ""]])
    if (v !== "") dl.append(el("dt", {text: k}), el("dd", {text: v}));
  const failed = b.failed.length
    ? table(["job", "row", "variation", "reason"], b.failed.map(f =>
        el("tr", {"data-failed": f.job},
           el("td", {class: "mono"}, el("a", {href: "/?job=" + encodeURIComponent(f.job),
                                              text: f.job.slice(0, 8)})),
           el("td", {class: "num", text: f.row}), el("td", {class: "num", text: f.variation}),
           el("td", {class: "error", text: f.error || ""}))))
    : el("p", {class: "mute", text: "No failed jobs."});
  return [section("Batch", "wide", dl, bar(b.counts, b.total),
                  el("p", {class: "mute", text: STATES.filter(s => b.counts[s])
                                                  .map(s => `${s} ${b.counts[s]}`).join("  ")})),
          section("Failed jobs", "wide", failed)];
}

let lastSeen = null, live = {};
function show(parts, data) {
  const seen = JSON.stringify({...data, now: 0, live});
  if (seen === lastSeen) return;  // nothing changed: keep the page (and its images) as is
  lastSeen = seen;
  document.getElementById("main").replaceChildren(...parts);
  if (data.storage) document.getElementById("storage").textContent = data.storage;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.body.dataset.loaded = "1";
}
function fail(e) {
  lastSeen = null;
  document.getElementById("main").replaceChildren(
    section("Error", "wide", el("p", {class: "error", text: String(e)})));
}
// One request in flight at most: a change during one is read once it is done.
let inflight = false, again = false;
async function read(url, render) {
  if (inflight) { again = true; return; }
  inflight = true;
  try {
    const resp = await fetch(url, {credentials: "same-origin"});
    if (!resp.ok) throw new Error((await resp.text()).trim() || resp.status);
    render(await resp.json());
  } catch (e) { fail(e); }
  inflight = false;
  if (again) { again = false; read(url, render); }
}
function follow(url, handlers) {
  const source = new EventSource(url);
  for (const [name, fn] of Object.entries(handlers))
    source.addEventListener(name, ev => fn(JSON.parse(ev.data)));
  return source;
}

const params = new URLSearchParams(location.search);
const job = params.get("job"), batchName = params.get("batch");
// What the server read for this page, so it shows at once (then live updates follow).
const held = document.getElementById("initial");
const initial = held ? JSON.parse(held.textContent) : null;
if (job) {
  const url = "/api/job/" + encodeURIComponent(job);
  let data = null;
  const render = d => { data = d; show(jobPage(d).concat(livePart()), d); };
  const livePart = () => {
    if (!live.total && !live.png) return [];
    const bits = [];
    if (live.total) bits.push(el("p", {id: "progress", text: `step ${live.step}/${live.total}`}));
    if (live.png) bits.push(el("figure", {}, el("img", {id: "preview", src: live.png,
      alt: "preview"}), el("figcaption", {text: "preview at step " + live.pstep})));
    return [section("Live", "wide", ...bits)];
  };
  if (initial) render(initial); else read(url, render);
  const source = follow("/v1/jobs/" + encodeURIComponent(job) + "/events", {
    state: s => { if (s.state !== "running") live = {}; read(url, render);
                  if (["succeeded", "failed", "cancelled"].includes(s.state)) source.close(); },
    progress: p => { live = {...live, step: p.step, total: p.total}; if (data) render(data); },
    preview: p => { live = {...live, png: p.png, pstep: p.step}; if (data) render(data); },
  });
} else if (batchName) {
  const url = "/api/batch/" + encodeURIComponent(batchName);
  if (initial) show(batchPage(initial), initial); else read(url, b => show(batchPage(b), b));
  follow("/api/overview/events", {overview: () => read(url, b => show(batchPage(b), b))});
} else {
  const front = data => show([queues(data), workers(data), batches(data), recent(data)], data);
  if (initial) front(initial);
  const source = follow("/api/overview/events", {
    overview: front,
    unavailable: name => fail("farm unavailable: " + name),
  });
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) fail("disconnected"); };
}
</script>
</body>
</html>
"""

LOGIN = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>render-farm: log in</title>
<style>
  body { margin:0; font:14px/1.4 system-ui, sans-serif; background:#f4f5f7; color:#1d2330; }
  form { max-width:420px; margin:12vh auto; background:#fff; border:1px solid #dde1e8;
         border-radius:6px; padding:20px; display:grid; gap:10px; }
  input { font:inherit; padding:6px 8px; border:1px solid #dde1e8; border-radius:4px; }
  button { font:inherit; padding:6px; border:0; border-radius:4px; background:#2f6fdf; color:#fff; }
  .error { color:#d24b3e; }
</style>
</head>
<body>
<form method="post" action="/login">
  <h1>render-farm</h1>
  <label for="token">API token (read scope)</label>
  <input id="token" name="token" type="password" autocomplete="off" required>
  <button type="submit">Log in</button>
  <p class="error">{message}</p>
</form>
</body>
</html>
"""
