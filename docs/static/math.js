// Typeset $...$ and $$...$$ with the site's own KaTeX. A formula KaTeX cannot parse stays as text
// and is reported on the console (throwOnError), which the docs test counts as an error.
document.addEventListener("DOMContentLoaded", () => {
  renderMathInElement(document.querySelector("main") || document.body, {
    delimiters: [
      {left: "$$", right: "$$", display: true},
      {left: "\\[", right: "\\]", display: true},
      {left: "$", right: "$", display: false},
      {left: "\\(", right: "\\)", display: false},
    ],
    throwOnError: true,
  });
  document.documentElement.dataset.math = "typeset";
});
