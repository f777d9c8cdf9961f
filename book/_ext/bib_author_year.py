"""The bibliography's labels as the text cites (``bibtex_reference_style: author_year`` writes [Voss et al., 2021]
in the text; pybtex's default labels would list the same work as [VGC+21]): a pybtex style ``author_year_list``,
unsrt's formatting with author-year labels, selected by ``bibtex_default_style``."""

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def author_year(entry) -> str:
    """"Voss, 2021", "Gao and Tour, 2024" or "Voss et al., 2021": the last names of the authors (or editors)."""
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [" ".join(p.last_names) for p in people] or [entry.fields.get("title", entry.key)]
    who = names[0] if len(names) == 1 else " and ".join(names) if len(names) == 2 else f"{names[0]} et al."
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            yield author_year(entry)


class AuthorYearListStyle(UnsrtStyle):
    default_label_style = AuthorYearLabels


def setup(app):
    register_plugin("pybtex.style.formatting", "author_year_list", AuthorYearListStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
