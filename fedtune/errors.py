"""Errors that the CLI turns into one line and an exit code."""


class FedtuneError(Exception):
    """A problem the user can act on. `exit_code` 2 means bad input, 1 a failure while working."""

    exit_code = 1


class BadInput(FedtuneError):
    """Input that cannot be used: a missing file, a bad key, an update from the wrong parent."""

    exit_code = 2


class StageFailed(FedtuneError):
    """The input was fine but the work could not finish (e.g. training diverged)."""

    exit_code = 1


class VerifyFailed(FedtuneError):
    """`fedtune verify` found a file or log line that is not what the registry's signatures and hashes say."""

    exit_code = 1


class BudgetSpent(BadInput):
    """The privacy budget cannot pay for another round: the coordinator's (central, distributed) or a site's
    own ledger (local). `simulate` stops there; the CLI exits 2 like any refused input."""


class Waiting(FedtuneError):
    """A round that cannot finish yet because it waits for other parties (secure aggregation's unmask answers).
    Nothing is wrong and nothing was lost: the CLI prints what it waits for and exits 3; run it again later."""

    exit_code = 3
