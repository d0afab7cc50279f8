// The playground's entry point: tabs, the API key field, and the model pickers.

import { apiKey, listModels, setApiKey } from "./api.js";
import { setupChat } from "./chat.js";
import { setupCompletions } from "./completions.js";
import { setupEmbeddings } from "./embeddings.js";
import { addSamplingFields, fillModels } from "./ui.js";

const panels = {
  chat: document.getElementById("panel-chat"),
  completions: document.getElementById("panel-completions"),
  embeddings: document.getElementById("panel-embeddings"),
};
const notice = document.getElementById("notice");

function setupTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  const select = (tab) => {
    for (const other of tabs) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
    }
    tab.focus();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step) select(tabs[(i + step + tabs.length) % tabs.length]);
    });
  });
}

function say(message) {
  notice.textContent = message;
  notice.hidden = !message;
}

async function loadModels() {
  let models = [];
  try {
    models = await listModels();
    say(models.length ? "" : "The server serves no models right now.");
  } catch (error) {
    const hint = error.status === 401 ? " Enter the server's API key above." : "";
    say(`Could not list the models: ${error.message}${hint}`);
  }
  fillModels(panels.chat.querySelector("[name=model]"), models, "chat");
  fillModels(panels.completions.querySelector("[name=model]"), models, "completions");
  fillModels(panels.embeddings.querySelector("[name=model]"), models, "embeddings");
}

function setupKey() {
  const field = document.getElementById("api-key");
  field.value = apiKey();
  field.addEventListener("change", () => {
    setApiKey(field.value.trim());
    loadModels();
  });
}

function collapseSettingsWhenNarrow() {
  if (window.matchMedia("(max-width: 760px)").matches) {
    for (const details of document.querySelectorAll("details.settings")) details.open = false;
  }
}

addSamplingFields(document);
setupTabs();
setupKey();
collapseSettingsWhenNarrow();
setupChat(panels.chat);
setupCompletions(panels.completions);
setupEmbeddings(panels.embeddings);
loadModels();
