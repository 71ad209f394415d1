"""The typed error hierarchy shared by every package: every error the tool raises for bad input is a `BtpError`
defined here, and nowhere else. CLIs print one line and exit with code 2 (see `btp.cli.common`)."""


class BtpError(Exception):
    """Base of every error the tool raises for bad input; the message says what was expected and found.

    `option`: the library parameter at fault (`max_batch`), when there is one; the message then continues the
    sentence it begins (`BuildError("must be >= 1, got 0", option="max_batch")` reads "max_batch must be >= 1,
    got 0"), or names it where it says `{option}`; a command line names its own flag instead (`--max-batch must
    be >= 1, got 0`, see `btp.cli.common.run_main`)."""

    def __init__(self, message: str = "", *, option: str | None = None):
        super().__init__(message)
        self.message, self.option = message, option

    def __str__(self) -> str:
        return self._with(self.option)

    def render(self, flags: dict[str, str] | None = None, options=None) -> str:
        """The message with the command line's flag for `option`: `flags[option]`, else `--` + its dashed name
        when the command has that option (`options`: its option names, None: assume it has), else the name."""
        name = self.option
        if name in (flags or {}):
            name = flags[name]
        elif name and (options is None or name in options):
            name = "--" + name.replace("_", "-")
        return self._with(name)

    def _with(self, name: str | None) -> str:
        if not name:
            return self.message
        return self.message.replace("{option}", name) if "{option}" in self.message else f"{name} {self.message}"


class PlanError(BtpError):
    """A plan document is invalid or does not fit the model."""


class ModelError(BtpError):
    """A model cannot be loaded or is not a supported LLaVA-style checkpoint."""


class ArtifactError(BtpError):
    """An artifact directory is missing, incomplete, tampered with or of an unknown format."""


class BuildError(BtpError):
    """A build cannot start or cannot finish (OUT exists, unwritable, bad limits, lint violations)."""


class InputError(BtpError):
    """An image or prompt the model cannot take."""


class DataError(InputError):
    """The calibration data is missing or malformed; the message names the file and line."""


class DependencyError(BtpError):
    """An optional package (a backend) or a device that the request needs is not available here."""


class RequestError(InputError):
    """A request a server refuses: its HTTP `status`, the request field at fault `param`, a short reason `code`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
