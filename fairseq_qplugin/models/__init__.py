from . import transformer_bcq  # noqa: F401  (registers transformer_bcq and its presets)
from . import transformer_int8  # noqa: F401  (registers transformer_int8 and its presets)
from . import transformer_kmeans  # noqa: F401  (registers transformer_kmeans and its presets)
from . import transformer_packed  # noqa: F401  (registers transformer_packed)
