"""Sparse autoencoders on InceptionV1's mixed4a-4e: harvest, train, analyse, show.

The folders are the layers, bottom to top; a module imports its own layer and those below it,
never one above (``tests/test_layout.py``):

``config``, ``files``, ``progress``, ``distributed``, ``numba_threads``, ``allocator``
    the foundation: job configs (dataclasses, the CLI is generated from them), atomic writes and
    on-disk names, progress bars, torch.distributed helpers, Numba's threads, and the memory policy
    of long jobs (freed memory kept while they run).
``data/``
    images in, activation vectors out: ``images`` (sources, labels), ``inception`` (the model, its
    layers and branch slices, its input, forward hooks), ``sampling`` (chapter 02), ``harvest``,
    ``store`` (the sharded on-disk store) and ``batches`` (shuffled training streams from it).
``sae/``
    a sparse autoencoder on any vectors: ``loss`` (the equation and the loss, chapter 03),
    ``model`` (the fast ``TopKSAE``), ``kernels`` and ``screened_topk`` (its sparse decoder and exact
    CPU TopK), ``adam``, ``checkpoint``, ``source`` (what it trains on), ``train`` (the loop) and
    ``per_layer`` (one process per layer).
``analysis/``
    what the features mean: ``spliced`` (03), ``branches`` (04), ``circuits`` (05), ``embed`` (06),
    ``selection`` (07), ``image_features`` (08), ``compare`` (09), and the machinery they use:
    ``examples`` (dataset examples), ``labels`` (automatic labels), ``featviz`` (Lucent).
``show/``
    pictures and pages: ``style``, ``page`` (how a chapter shows things), ``plots`` (plotly figures),
    ``composites`` (PIL figures), ``atlas`` (the static atlas), ``explorer`` (the live widgets).
``run/``
    a profile's run directory and the book made from it: ``profiles`` (and the settings the
    environment gives), ``artifacts`` (the typed ``Run``: a method per artifact), ``author`` (the
    paper's published SAEs), ``publish``, ``book``, ``export`` (chapters to modules).
``cli``
    ``python -m helpers harvest|train|book|export|verify|publish``.

The modules a chapter defines (``data.sampling``, ``sae.loss``, ``analysis.spliced``,
``analysis.branches``, ``analysis.circuits``, ``analysis.embed``, ``analysis.selection``,
``analysis.image_features``, ``analysis.compare``) are generated from its ``#| export`` cells by
``python -m helpers export`` and never edited by hand.
"""

__version__ = "0.1.0"
