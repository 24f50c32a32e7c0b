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

// While the instance is busy or unhealthy, refresh the status panel every second; no page reload.
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
