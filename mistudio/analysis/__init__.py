"""Reading stored activations at scale: the training loader, dataset-wide feature statistics and top examples,
feature views and plots. Everything here reads stores through :class:`mistudio.extraction.Extraction`'s read
interface and never writes activations."""
