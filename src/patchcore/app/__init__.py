"""The application: configuration, the ``patchcore`` command line, run folders, the train / evaluate /
predict commands, the feature cache and experiment tracking."""
