"""Pure computation: the ``PatchCore`` estimator, backbones and hooks, patch features, coreset samplers,
the nearest-neighbour index, scoring and the feature store. No console, no configuration, no files but the
model's own state and the features it streams."""
