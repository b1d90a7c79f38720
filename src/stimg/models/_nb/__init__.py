from ._ensemble import NBEnsemble
from ._finetune import NBFinetuner
from ._model import NBRegressor

__all__ = ["NBEnsemble", "NBFinetuner", "NBRegressor"]
