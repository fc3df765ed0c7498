"""The functional core: `FunctionalModel` (a module as a function of a parameter dict), the likelihoods of
its outputs, and the `--device` check."""
