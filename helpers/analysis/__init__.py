"""What the features mean: the chapters' analyses (spliced-in evaluation, branch specialisation,
circuits, UMAP, which examples to show, one image's features, comparing SAEs) and the machinery
they use (dataset examples, automatic labels, feature visualisation)."""
