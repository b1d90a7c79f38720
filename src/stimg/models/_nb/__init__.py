from ._ensemble import NBEnsemble
from ._model import NBRegressor

__all__ = ["NBEnsemble", "NBRegressor"]
