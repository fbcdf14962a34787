"""Data sets: pre-extracted code files, Fashion-MNIST, image folders."""
