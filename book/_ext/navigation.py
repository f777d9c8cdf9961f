"""The table of contents on phones and tablets, and one search box on a desktop.

pydata-sphinx-theme (0.16 and later) opens the contents drawer from the *first* ``.primary-toggle`` of the page,
which under sphinx-book-theme is the navbar's icon, hidden at every width; the button a reader sees (in the
article's header) has no handler, so below 992 px the contents could not be opened. A click on any visible
toggle is passed to the first. On a desktop the theme's top band held only a second search box beside the
sidebar's: the band is not drawn (Ctrl+K still opens the search). One inline script in the page's head does
both (the style is in place before the body is drawn).
"""

SCRIPT = """
document.head.insertAdjacentHTML("beforeend", "<style>.bd-header { display: none !important; }</style>");
document.addEventListener("DOMContentLoaded", function () {
  var toggles = document.querySelectorAll(".primary-toggle");
  for (var i = 1; i < toggles.length; i++) {
    toggles[i].addEventListener("click", function (event) {
      event.preventDefault();
      event.stopPropagation();
      toggles[0].click();
    });
  }
});
"""


def setup(app):
    app.add_js_file(None, body=SCRIPT)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
