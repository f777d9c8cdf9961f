"""A profile's run directory and what is made from it: profiles and settings, the typed ``Run``
(a method per artifact), the author's SAEs, publishing, the book build and the chapter export."""
