// editbatch dashboard: local times, confirmations, the live batch view, and the review
// gallery (comparison slider, keyboard review). No framework, nothing loaded from elsewhere.
"use strict";

// The review decisions the server accepts (pipeline.states.ReviewDecision).
const APPROVED = "approved";
const REJECTED = "rejected";

function localTimes(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const when = new Date(el.getAttribute("datetime"));
    if (!isNaN(when)) {
      el.textContent = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
    }
  }
}

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

// Every form with data-confirm asks first (pause, resume, cancel, retry, export, re-run).
document.addEventListener("submit", (event) => {
  const message = event.target.dataset && event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});

// The batch page's live part: fetched every 2 s while the batch runs (10 s otherwise) and
// swapped in place when it changed, unless the person is typing in one of its fields.
function startLive() {
  let live = document.getElementById("live");
  if (!live || !live.dataset.url) return;
  let last = live.outerHTML;
  async function tick() {
    const active = document.activeElement;
    const typing = active && live.contains(active) && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName);
    if (!document.hidden && !typing) {
      try {
        const response = await fetch(live.dataset.url, { headers: { accept: "text/html" }, credentials: "same-origin" });
        if (response.status === 401) return;  // signed out: stop
        if (response.ok) {
          const html = (await response.text()).trim();
          if (html !== last) {
            const holder = document.createElement("div");
            holder.innerHTML = html;
            const fresh = holder.firstElementChild;
            live.replaceWith(fresh);
            live = fresh;
            last = html;
            localTimes(live);
          }
        }
      } catch (err) { /* the server restarts: try again at the next tick */ }
    }
    setTimeout(tick, Number(live.dataset.pollMs) || 10000);
  }
  setTimeout(tick, 2000);
}

// -- review gallery -------------------------------------------------------------------------

function cards() { return Array.from(document.querySelectorAll("#gallery .card")); }

function setupSliders(root) {
  for (const slider of root.querySelectorAll(".slider")) {
    const after = slider.closest(".card").querySelector(".compare .after");
    const show = () => { after.style.clipPath = `inset(0 0 0 ${slider.value}%)`; };
    slider.addEventListener("input", show);
    show();
  }
}

async function review(card, decision, note) {
  const form = card.querySelector("form.review");
  if (!form) return false;
  const body = new URLSearchParams();
  body.set("csrf_token", csrfToken());
  body.set("output_id", card.dataset.output);
  body.set("decision", decision);
  body.set("note", note !== undefined ? note : form.querySelector(".note").value);
  const response = await fetch(form.action, {
    method: "POST", body, credentials: "same-origin",
    headers: { accept: "application/json", "x-csrf-token": csrfToken() },
  });
  if (!response.ok) {
    card.querySelector(".decision").textContent = `not saved (${response.status})`;
    return false;
  }
  const saved = await response.json();
  const counts = document.getElementById("review-counts");
  if (counts && saved.reviews) {
    const r = saved.reviews;
    counts.textContent = `${r.approved.toLocaleString()} approved · ${r.rejected.toLocaleString()} rejected · ${r.unreviewed.toLocaleString()} unreviewed`;
  }
  const rerun = document.getElementById("rerun-link");
  if (rerun && saved.rerun !== undefined) rerun.textContent = `Re-run rejected (${saved.rerun > 1000 ? "1000+" : saved.rerun})`;
  card.dataset.decision = decision;
  const label = card.querySelector(".decision");
  label.textContent = decision;
  label.className = `decision decision-${decision}`;
  return true;
}

function move(card, step) {
  const all = cards();
  const next = all[all.indexOf(card) + step];
  if (next) { next.focus(); next.scrollIntoView({ block: "nearest" }); }
}

function setupGallery() {
  const gallery = document.getElementById("gallery");
  if (!gallery) return;
  setupSliders(gallery);
  // Buttons save in place (no reload); without script the forms post as usual.
  gallery.addEventListener("click", async (event) => {
    const button = event.target.closest("form.review button[name=decision]");
    if (!button) return;
    event.preventDefault();
    const card = button.closest(".card");
    await review(card, button.value);
  });
  gallery.addEventListener("keydown", async (event) => {
    if (event.target.classList.contains("note")) {
      const card = event.target.closest(".card");
      if (event.key === "Enter") {
        event.preventDefault();
        await review(card, card.dataset.decision || REJECTED, event.target.value);
        card.focus();
        move(card, 1);
      } else if (event.key === "Escape") {
        card.focus();
      }
      return;
    }
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (/^(INPUT|TEXTAREA|SELECT|BUTTON)$/.test(event.target.tagName)) return;
    const card = event.target.closest(".card");
    if (!card) return;
    if (event.key === "j") { event.preventDefault(); move(card, 1); }
    else if (event.key === "k") { event.preventDefault(); move(card, -1); }
    else if (event.key === "a") {
      event.preventDefault();
      if (await review(card, APPROVED)) move(card, 1);
    } else if (event.key === "r") {
      event.preventDefault();
      if (await review(card, REJECTED)) {
        const note = card.querySelector(".note");
        if (note) note.focus();
      }
    }
  });
  // j/k from anywhere on the page start at the first card.
  document.addEventListener("keydown", (event) => {
    if (event.target !== document.body) return;
    if (event.key === "j" || event.key === "k") {
      const first = cards()[0];
      if (first) { event.preventDefault(); first.focus(); }
    }
  });
}

// Figures that take longer to read (reuse savings) arrive after the page, once.
async function fillDeferred() {
  for (const el of document.querySelectorAll("[data-url]:not(#live)")) {
    try {
      const response = await fetch(el.dataset.url, { credentials: "same-origin" });
      if (response.ok) el.textContent = await response.text();
    } catch (err) { /* the link stays */ }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  fillDeferred();
  startLive();
  setupGallery();
});
