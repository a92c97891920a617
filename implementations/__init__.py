"""bnbench's built-in BatchNorm implementations, each registered through the
``bnbench.implementations`` entry-point group exactly as a third-party package would be."""
