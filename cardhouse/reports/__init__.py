from .plots import plot_bos_trace, plot_sweep, plot_top_magnitudes
from .tables import scan_tables, weights_table
