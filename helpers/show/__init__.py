"""Pictures and pages, from numbers computed below: the book's style, how a chapter shows things,
plotly and PIL figures, the static atlas and the live explorer."""
