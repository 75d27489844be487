"""The one exception family the CLI turns into a one-line error with exit code 2."""


class UserInputError(ValueError):
    """Bad input from the user: a path, an argument, a file that does not fit. Message is one line."""


class PlanRuntimeError(UserInputError):
    """A plan cannot run on this model or these inputs (unsupported feature, mismatched plan)."""
