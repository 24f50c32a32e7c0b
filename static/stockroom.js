// Stockroom pages: copy buttons, revealing secrets, and live status while an instance is busy.
"use strict";

document.addEventListener("click", async (event) => {
  const copy = event.target.closest("[data-copy-secret]");
  if (copy) {
    const source = document.getElementById(copy.dataset.copySecret);
    const text = source.dataset.secret ?? source.textContent;
    try {
      await navigator.clipboard.writeText(text);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => (copy.textContent = "Copy"), 1500);
  }
  const reveal = event.target.closest("[data-reveal]");
  if (reveal) {
    const hiding = reveal.textContent === "Hide";
    reveal.closest("section").querySelectorAll("[data-secret]").forEach((element) => {
      element.dataset.masked ??= element.textContent;
      element.textContent = hiding ? element.dataset.masked : element.dataset.secret;
    });
    reveal.textContent = hiding ? "Show" : "Hide";
  }
});

document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});

// While the instance is busy, unhealthy or unreachable, refresh the status panel every second; no page reload.
const panel = document.getElementById("panel");
if (panel) {
  const refresh = async () => {
    if (!panel.querySelector('[data-busy="true"]')) return;
    const response = await fetch(panel.dataset.panelUrl, { headers: { Accept: "text/html" } });
    if (response.status === 404) {
      window.location.assign("/");  // deleted: back to the dashboard
      return;
    }
    if (response.ok) panel.innerHTML = await response.text();
  };
  setInterval(refresh, 1000);
}

// An import's upload, sent with XMLHttpRequest so that its progress shows; the answer is the
// instance page again (with its message), which the browser then shows.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.matches("[data-upload]") || event.defaultPrevented) return;
  event.preventDefault();
  const bar = form.querySelector("progress");
  const state = form.querySelector("[data-upload-state]");
  const button = form.querySelector("button[type=submit]");
  const request = new XMLHttpRequest();
  request.open("POST", form.action);
  request.upload.addEventListener("progress", (progress) => {
    if (!progress.lengthComputable) return;
    bar.value = Math.round((100 * progress.loaded) / progress.total);
    state.textContent = `${bar.value}% sent`;
  });
  request.addEventListener("load", () => window.location.assign(request.responseURL || window.location.href));
  request.addEventListener("error", () => {
    state.textContent = "The upload failed; try again.";
    button.disabled = false;
  });
  bar.hidden = false;
  button.disabled = true;
  state.textContent = "Sending…";
  request.send(new FormData(form));
});
