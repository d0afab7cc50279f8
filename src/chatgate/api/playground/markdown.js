// Markdown-ish rendering of model text: paragraphs, fenced code blocks and inline code.
// Everything is built from DOM nodes and textContent, so no text can become markup.

const FENCE = /^\s*```\s*([\w+-]*)\s*$/;

/** Split `text` into prose and fenced code; an unclosed fence (mid-stream) runs to the end. */
export function blocks(text) {
  const out = [];
  let prose = [];
  let code = null;
  for (const line of text.split("\n")) {
    const fence = line.match(FENCE);
    if (code) {
      if (fence && !fence[1]) {
        out.push(code);
        code = null;
      } else {
        code.lines.push(line);
      }
    } else if (fence) {
      out.push({ kind: "prose", text: prose.join("\n") });
      prose = [];
      code = { kind: "code", lang: fence[1], lines: [] };
    } else {
      prose.push(line);
    }
  }
  if (code) out.push(code);
  out.push({ kind: "prose", text: prose.join("\n") });
  return out;
}

function inline(text) {
  // Odd pieces of a split on backticks are inline code.
  return text.split("`").map((piece, i) => {
    if (i % 2 === 0) return document.createTextNode(piece);
    const code = document.createElement("code");
    code.textContent = piece;
    return code;
  });
}

function paragraphs(text) {
  return text
    .split(/\n{2,}/)
    .filter((part) => part.trim())
    .map((part) => {
      const p = document.createElement("p");
      p.append(...inline(part.replace(/^\n+|\n+$/g, "")));
      return p;
    });
}

function codeBlock({ lang, lines }) {
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (lang) pre.dataset.lang = lang;
  code.textContent = lines.join("\n");
  pre.append(code);
  return pre;
}

/** Replace the contents of `container` with `text` rendered as paragraphs and code. */
export function render(container, text) {
  const nodes = blocks(text).flatMap((b) => (b.kind === "code" ? [codeBlock(b)] : paragraphs(b.text)));
  container.replaceChildren(...nodes);
}
