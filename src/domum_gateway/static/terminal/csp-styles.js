// xterm.js computes part of its CSS at run time (cell size, colours, scrollbar) and writes
// it into <style> elements and style="" attributes. The gateway's Content-Security-Policy
// (style-src 'self', no 'unsafe-inline') blocks both, by design. This module hands xterm
// constructable stylesheets and CSSOM declarations instead: the same rules, applied by our
// own same-origin script, so the policy stays strict. Import it before creating a Terminal.

const createElement = Document.prototype.createElement;
const setAttribute = Element.prototype.setAttribute;

function adoptedStyle(doc) {
  const sheet = new CSSStyleSheet();
  doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
  // An inert element xterm can append, fill and remove like a <style>.
  const holder = createElement.call(doc, "template");
  let text = "";
  Object.defineProperty(holder, "textContent", {
    get: () => text,
    set: (value) => {
      text = value == null ? "" : String(value);
      sheet.replaceSync(text);
    },
  });
  const remove = holder.remove.bind(holder);
  holder.remove = () => {
    doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((s) => s !== sheet);
    remove();
  };
  return holder;
}

document.createElement = function (tagName, options) {
  if (String(tagName).toLowerCase() === "style") return adoptedStyle(this);
  return createElement.call(this, tagName, options);
};

Element.prototype.setAttribute = function (name, value) {
  if (String(name).toLowerCase() === "style" && this.style) {
    this.style.cssText = String(value);
    return;
  }
  return setAttribute.call(this, name, value);
};
