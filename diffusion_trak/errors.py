"""User-fixable errors: the CLI prints their one-line message (no traceback) and exits with 2."""


class UserError(Exception):
    """An error the user can fix; its message names the fix."""


class InputError(UserError, ValueError):
    """Inputs that do not fit the model or the store (shapes, channels, steps, empty data)."""


class NonFiniteError(UserError, FloatingPointError):
    """NaN or Inf in inputs or gradients."""


class CheckpointError(InputError):
    """A checkpoint folder or training state that cannot be used (missing, incomplete, another model class,
    or a file that could run code when loaded)."""


class LatentError(InputError):
    """A user-fixable problem of a latent or text-conditional model: VAE, latents, captions (one line naming the fix)."""
