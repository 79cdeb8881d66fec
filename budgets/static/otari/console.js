/* Otari budget console: filter drop-downs and filter suggestions. No dependencies. */
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const dropdowns = [...document.querySelectorAll("details.otari-filter")];
  // One drop-down open at a time; a click elsewhere or Escape closes it.
  dropdowns.forEach((d) => d.addEventListener("toggle", () => {
    if (d.open) dropdowns.forEach((o) => { if (o !== d) o.open = false; });
    const input = d.open && d.querySelector("input[type=search], input[type=date]");
    if (input) input.focus();
  }));
  document.addEventListener("click", (e) => {
    dropdowns.forEach((d) => { if (d.open && !d.contains(e.target)) d.open = false; });
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") dropdowns.forEach((d) => { d.open = false; });
  });

  // Suggestions as you type (a <datalist> filled from the console's suggestion URL).
  document.querySelectorAll("input[data-suggest]").forEach((input) => {
    const list = document.getElementById(input.getAttribute("list"));
    let timer = null;
    let asked = null;
    const ask = () => {
      const q = input.value.trim();
      if (q === asked) return;
      asked = q;
      fetch(input.dataset.suggest + "?q=" + encodeURIComponent(q), {credentials: "same-origin"})
        .then((r) => (r.ok ? r.json() : {results: []}))
        .then((data) => {
          list.replaceChildren(...data.results.map((s) => {
            const option = document.createElement("option");
            option.value = s.value;
            if (s.label && s.label !== s.value) option.label = s.label;
            return option;
          }));
        });
    };
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(ask, 150); });
    input.addEventListener("focus", ask);
  });
});

// The usage log's totals over the whole filter (usage.admin.UsageLogAdmin.totals_view).
document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("otari-usage-totals");
  if (!box) return;
  const n = (x) => Number(x).toLocaleString("en-US");
  const strong = (text) => { const s = document.createElement("strong"); s.textContent = text; return s; };
  const span = (...parts) => {
    const s = document.createElement("span");
    parts.forEach((p) => s.append(p));
    return s;
  };
  fetch(box.dataset.totalsUrl, {credentials: "same-origin"})
    .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
    .then((t) => {
      if (!t.complete) {
        box.replaceChildren(span("Too many rows to total in time: narrow the dates to see totals."));
        return;
      }
      const cost = strong(t.cost);
      cost.id = "otari-totals-cost";
      if (t.cost !== t.cost_exact) cost.title = t.cost_exact + " exactly";
      const requests = strong(n(t.requests));
      requests.id = "otari-totals-requests";
      const note = span("totals over every row of this filter");
      note.className = "otari-muted";
      box.replaceChildren(
        span(requests, t.requests === 1 ? " request" : " requests"),
        span(strong(n(t.failed)), " not successful"),
        span(strong(n(t.prompt_tokens)), " tokens in · ", strong(n(t.completion_tokens)), " out"),
        span("cost ", cost),
        note,
      );
    })
    .catch(() => box.replaceChildren(span("Totals could not be loaded.")));
});
