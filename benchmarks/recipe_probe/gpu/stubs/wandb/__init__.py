"""Stand-in for wandb where it is not installed: axolotl imports it at module level
(axolotl/utils/callbacks) but calls it only when use_wandb is set, which these recipes
never set. Any attribute is a no-op."""

run = None


def __getattr__(name):
    def _noop(*args, **kwargs):
        return None

    return _noop
