// The embeddings tab: embed two texts and show their cosine similarity.

import { call } from "./api.js";
import { Generation, showError } from "./ui.js";

/** cos(a, b) = a·b / (|a| |b|). */
export function cosine(a, b) {
  let dot = 0;
  let aa = 0;
  let bb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    aa += a[i] * a[i];
    bb += b[i] * b[i];
  }
  return dot / (Math.sqrt(aa) * Math.sqrt(bb) || 1);
}

/** Wire up the embeddings panel. */
export function setupEmbeddings(panel) {
  const form = panel.querySelector("form");
  const result = panel.querySelector(".similarity");
  const stats = result.querySelector(".stats");
  const generation = new Generation(panel);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (generation.busy) return;
    const body = {
      model: panel.querySelector("[name=model]").value,
      input: [form.elements.a.value, form.elements.b.value],
    };
    let answer = null;
    const { outcome, timer, error } = await generation.run(async (signal) => {
      answer = await call("v1/embeddings", body, signal);
    });
    result.hidden = false;
    stats.classList.remove("error");
    if (outcome !== "done") {
      result.querySelector("output").value = "—";
      result.querySelector("meter").value = 0;
      if (error) showError(stats, error);
      return;
    }
    const [a, b] = answer.data.map((item) => item.embedding);
    const similarity = cosine(a, b);
    result.querySelector("output").value = similarity.toFixed(4);
    result.querySelector("meter").value = similarity;
    const ms = Math.round(timer.end - timer.start);
    stats.textContent = `${a.length} dimensions · ${answer.usage.prompt_tokens} tokens · ${ms} ms`;
  });
}
