"""Model-based tests: random sequences of calls against a pure model of docs/contract.md.

Hypothesis drives reserves (new, re-sent, changed), clears, releases, status reads and
trades over a few ids, two linked connections and two currencies (plus an unsupported one,
an unknown connection and an impostor of a linked one), through the real app on real
PostgreSQL and Redis. After every step the answer must be the model's (status code, record
status and rejectionReason, or error text) and so must every balance, read back from
``GET /internal/v1/accounts/{partnersConnectionId}``.

Each run links two fresh connections, so runs share no account. The seed is fixed
(``derandomize``); ``OES_HYPOTHESIS_EXAMPLES`` runs more examples than CI's 15.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from starlette.testclient import TestClient

from tests.conftest import BitGo, Keys, Link, Response

EXAMPLES = int(os.environ.get("OES_HYPOTHESIS_EXAMPLES", "15"))
STEPS = 30
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    derandomize=True,  # the same sequences on every run: CI failures reproduce
    database=None,  # so nothing saved by an earlier local run changes what CI runs
    deadline=None,  # every step is HTTP to PostgreSQL and Redis
    # explain traces every line of a failing run again (sys.settrace before Python 3.12):
    # minutes on this much code, for little more than the shrunk steps already say.
    phases=[phase for phase in Phase if phase is not Phase.explain],
)

KINDS = ("allocation", "deallocation")
SUPPORTED = ("btc", "eth")  # in the test settings' OES_CURRENCIES
CURRENCIES = (*SUPPORTED, "usdt")  # usdt is not
# Who a reserve claims to come from: the two linked connections, then two that fail a rule.
FIRST, SECOND, STRANGER, IMPOSTOR = range(4)
ACCOUNTS = (FIRST, SECOND)
NOWHERE = 2  # a trade's account index that names no account
ZERO = (0, 0, 0)
OPENING = 50  # each account's opening balance per currency, from a trade
IDS = 6  # transfer ids, and trade externalIds, per run: steps mostly revisit them

# (kind, new status) -> how (available, pendingIn, held) move, in units of the quantity.
MOVES = {
    ("allocation", "reserved"): (0, 1, 0),
    ("allocation", "cleared"): (1, -1, 0),
    ("allocation", "released"): (0, -1, 0),
    ("deallocation", "reserved"): (-1, 0, 1),
    ("deallocation", "cleared"): (0, 0, -1),
    ("deallocation", "released"): (1, 0, -1),
}


def label(kind: str) -> str:
    return kind.capitalize()


# --- the model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reserve:
    """A reserve request, as far as its fingerprint goes (section 5)."""

    kind: str
    sender: int
    currency: str
    quantity: int


@dataclass
class Record:
    request: Reserve
    status: str
    reason: str | None
    partners_id: str | None = None  # learned from the first answer, then fixed
    created_at: str | None = None


@dataclass(frozen=True)
class Trade:
    account: int  # FIRST, SECOND or NOWHERE
    deltas: tuple[tuple[str, int], ...]  # sorted by currency


@dataclass(frozen=True)
class Expected:
    code: int
    error: str | None = None


OK = Expected(200)


class Model:
    """docs/contract.md sections 5 and 7, with no I/O: what each call must answer and do."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.trades: dict[str, Trade] = {}
        self.balances: dict[tuple[int, str], tuple[int, int, int]] = {}

    def balance(self, account: int, currency: str) -> tuple[int, int, int]:
        return self.balances.get((account, currency), ZERO)

    def _move(self, request: Reserve, status: str) -> None:
        key = (request.sender, request.currency)
        step = MOVES[(request.kind, status)]
        moved = tuple(
            b + s * request.quantity for b, s in zip(self.balance(*key), step, strict=True)
        )
        assert min(moved) >= 0, f"the model drove {key} negative: {moved}"
        self.balances[key] = (moved[0], moved[1], moved[2])

    def _rule_failure(self, request: Reserve) -> str | None:
        """Section 5.1's business rules, in order."""
        if request.currency not in SUPPORTED:
            return "Unsupported currency"
        if request.sender == STRANGER:
            return "Unknown connection"
        if request.sender == IMPOSTOR:
            return "Connection mismatch"
        available = self.balance(request.sender, request.currency)[0]
        if request.kind == "deallocation" and request.quantity > available:
            return "Insufficient funds"
        return None

    def reserve(self, transfer_id: str, request: Reserve) -> Expected:
        stored = self.records.get(transfer_id)
        if stored is not None and stored.request != request:
            return Expected(409, f"{request.kind}Id already used with different parameters")
        if stored is not None and stored.status != "released":
            return OK  # reserved, rejected, cleared: the stored record, nothing moves
        reason = self._rule_failure(request)
        status = "rejected" if reason else "reserved"
        if stored is None:
            self.records[transfer_id] = Record(request, status, reason)
        else:  # released: the rules run again on the same record
            stored.status, stored.reason = status, reason
        if not reason:
            self._move(request, status)
        return OK

    def settle(self, kind: str, transfer_id: str, action: str) -> Expected:
        stored = self.records.get(transfer_id)
        if stored is None or stored.request.kind != kind or stored.status == "rejected":
            return Expected(404, f"{label(kind)} not found")
        target = {"clear": "cleared", "release": "released"}[action]
        if stored.status == "reserved":
            stored.status = target
            self._move(stored.request, target)
        elif stored.status != target:
            return Expected(409, f"{label(kind)} is {stored.status}")
        return OK

    def status(self, kind: str, transfer_id: str) -> Expected:
        stored = self.records.get(transfer_id)
        if stored is None or stored.request.kind != kind:
            return Expected(404, f"{label(kind)} not found")
        return OK

    def trade(self, external_id: str, trade: Trade) -> Expected:
        applied = self.trades.get(external_id)
        if applied is not None:
            if applied != trade:
                return Expected(409, "externalId already used with different parameters")
            return OK
        if trade.account == NOWHERE:
            return Expected(404, "Account not found")
        unsupported = sorted(c for c, _ in trade.deltas if c not in SUPPORTED)
        if unsupported:
            return Expected(422, f"Unsupported currency: {', '.join(unsupported)}")
        for currency, delta in trade.deltas:
            if delta < 0 and -delta > self.balance(trade.account, currency)[0]:
                return Expected(422, f"Insufficient funds: {currency}")
        for currency, delta in trade.deltas:
            available, pending_in, held = self.balance(trade.account, currency)
            self.balances[(trade.account, currency)] = (available + delta, pending_in, held)
        self.trades[external_id] = trade
        return OK


# --- the machine -------------------------------------------------------------------------

# Mostly what passes the rules, so that money moves; sometimes what does not.
CURRENCY = st.sampled_from((*SUPPORTED, *SUPPORTED, *SUPPORTED, "usdt"))
SAME_KIND = st.sampled_from((True, True, True, False))
UNKNOWN = st.sampled_from((None, None, None, None, None, "fresh", "not-a-uuid"))
# Round amounts often, so that balances meet requests exactly (the boundary of every rule).
ROUND = st.sampled_from((OPENING // 2, OPENING))
QUANTITIES = st.integers(min_value=1, max_value=60) | ROUND
Deltas = tuple[tuple[str, int], ...]
DELTAS = st.dictionaries(
    CURRENCY,
    st.integers(min_value=-60, max_value=-1) | ROUND.map(lambda q: -q) | QUANTITIES,
    min_size=1,
    max_size=2,
).map(lambda deltas: tuple(sorted(deltas.items())))


class TransfersMachine(RuleBasedStateMachine):
    transfers = Bundle("transfers")

    bitgo: BitGo  # given by a subclass: the test's, on the app under test

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.senders: list[Link] = []
        self.last_trade: dict[str, Trade] = {}
        self.trade_created: dict[str, str] = {}
        self.run = uuid.uuid4().hex[:12]  # names this run's trades

    # -- plumbing --

    def answer(self, response: Response, expected: Expected) -> dict[str, Any]:
        assert response.status_code == expected.code, (expected, response.text)
        body: dict[str, Any] = response.json()
        if expected.error is not None:
            assert body == {"error": expected.error}
        return body

    def check_record(self, kind: str, transfer_id: str, body: dict[str, Any]) -> None:
        record = self.model.records[transfer_id]
        sender = self.senders[record.request.sender]
        assert body[f"{kind}Id"] == transfer_id
        assert body["amount"] == {
            "currency": record.request.currency,
            "quantity": str(record.request.quantity),
        }
        assert (
            body["clientId"],
            body["connectionId"],
            body["partnersClientId"],
            body["partnersConnectionId"],
        ) == (
            sender.client_id,
            sender.connection_id,
            sender.partners_client_id,
            sender.partners_connection_id,
        )
        assert (body["status"], body.get("rejectionReason")) == (record.status, record.reason)
        # The gateway's id and the creation time stay with the record, re-reserved or not.
        record.partners_id = record.partners_id or body[f"partners{label(kind)}Id"]
        record.created_at = record.created_at or body["createdAt"]
        assert (body[f"partners{label(kind)}Id"], body["createdAt"]) == (
            record.partners_id,
            record.created_at,
        )

    def send_reserve(self, transfer_id: str, request: Reserve, as_int: bool) -> None:
        sender = self.senders[request.sender]
        quantity = request.quantity if as_int else str(request.quantity)
        response = self.bitgo.http.post(
            f"/bitgo/v1/{request.kind}s",
            json=sender.body(request.kind, transfer_id, quantity, currency=request.currency),
            headers=self.bitgo.headers(),
        )
        expected = self.model.reserve(transfer_id, request)
        body = self.answer(response, expected)
        if expected.code == 200:
            self.check_record(request.kind, transfer_id, body)

    def send_trade(self, external_id: str, trade: Trade, as_int: bool) -> None:
        link = None if trade.account == NOWHERE else self.senders[trade.account]
        response = self.bitgo.http.post(
            "/internal/v1/trades",
            json={
                "externalId": external_id,
                "partnersConnectionId": link.partners_connection_id if link else "nobody",
                "deltas": {c: d if as_int else str(d) for c, d in trade.deltas},
            },
            headers=self.bitgo.internal(),
        )
        self.last_trade[external_id] = trade
        expected = self.model.trade(external_id, trade)
        body = self.answer(response, expected)
        if expected.code != 200:
            return
        applied = self.model.trades[external_id]
        assert link is not None
        assert applied.account == trade.account
        assert {k: v for k, v in body.items() if k != "createdAt"} == {
            "externalId": external_id,
            "partnersConnectionId": link.partners_connection_id,
            "connectionId": link.connection_id,
            "deltas": {c: str(d) for c, d in applied.deltas},
            "settled": False,
        }
        created = self.trade_created.setdefault(external_id, body["createdAt"])
        assert body["createdAt"] == created

    # -- rules --

    @initialize()
    def link_two_connections(self) -> None:
        first, second = self.bitgo.link(), self.bitgo.link()
        stranger = Link(str(uuid.uuid4()), str(uuid.uuid4()), "stranger", str(uuid.uuid4()))
        impostor = replace(first, partners_client_id=f"{first.partners_client_id}-impostor")
        self.senders = [first, second, stranger, impostor]
        for account in ACCOUNTS:  # something to deallocate from the start
            opening = Trade(account, tuple((currency, OPENING) for currency in SUPPORTED))
            self.send_trade(f"trade-{self.run}-opening-{account}", opening, as_int=False)

    @precondition(lambda self: len(self.model.records) < IDS)
    @rule(
        target=transfers,
        kind=st.sampled_from(KINDS),
        sender=st.sampled_from((FIRST, SECOND, FIRST, SECOND, FIRST, SECOND, STRANGER, IMPOSTOR)),
        currency=CURRENCY,
        quantity=st.none() | QUANTITIES,
        as_int=st.booleans(),
    )
    def reserve_new(
        self, kind: str, sender: int, currency: str, quantity: int | None, as_int: bool
    ) -> str:
        """A new id; ``quantity`` None: exactly what the account has available, the edge
        between a deallocation reserved and one refused."""
        if quantity is None:
            quantity = max(1, self.model.balance(sender, currency)[0])
        transfer_id = str(uuid.uuid4())
        self.send_reserve(transfer_id, Reserve(kind, sender, currency, quantity), as_int)
        return transfer_id

    @rule(
        transfer_id=transfers,
        change=st.sampled_from((None, None, None, "kind", "sender", "currency", "quantity")),
        by=st.integers(min_value=1, max_value=3),
        as_int=st.booleans(),
    )
    def reserve_again(self, transfer_id: str, change: str | None, by: int, as_int: bool) -> None:
        """BitGo's retry of the same request (a JSON-integer quantity equals its digits), or
        the same id with one parameter changed: the 409 whatever the stored state."""
        stored = self.model.records[transfer_id].request
        request = {
            None: stored,
            "kind": replace(stored, kind=KINDS[1 - KINDS.index(stored.kind)]),
            "sender": replace(stored, sender=(stored.sender + by) % 4),
            "currency": replace(
                stored, currency=CURRENCIES[(CURRENCIES.index(stored.currency) + by) % 3]
            ),
            "quantity": replace(stored, quantity=stored.quantity + by),
        }[change]
        self.send_reserve(transfer_id, request, as_int)

    @precondition(lambda self: bool(self.released()))
    @rule(back=st.integers(min_value=0, max_value=7), as_int=st.booleans())
    def reserve_released_again(self, back: int, as_int: bool) -> None:
        """BitGo reserving a released id again: the rules run anew on the same record, and
        the funds may have gone meanwhile. Rare by chance alone, so a rule of its own."""
        released = self.released()
        transfer_id = released[max(0, len(released) - 1 - back)]
        self.send_reserve(transfer_id, self.model.records[transfer_id].request, as_int)

    @rule(
        transfer_id=transfers,
        action=st.sampled_from(("release", "clear", "status")),
        same_kind=SAME_KIND,
        unknown=UNKNOWN,
    )
    def settle_or_read(
        self, transfer_id: str, action: str, same_kind: bool, unknown: str | None
    ) -> None:
        """Clear, release or read a record (of its kind or the other), or an id never
        reserved: a fresh UUID, or one that is not a UUID at all."""
        kind = self.kind_of(transfer_id, same_kind)
        if unknown is not None:
            transfer_id = str(uuid.uuid4()) if unknown == "fresh" else unknown
        if action == "status":
            response = self.bitgo.status(kind, transfer_id)
            expected = self.model.status(kind, transfer_id)
        else:
            response = self.bitgo.put(kind, transfer_id, action)
            expected = self.model.settle(kind, transfer_id, action)
        body = self.answer(response, expected)
        if expected.code == 200:
            self.check_record(kind, transfer_id, body)

    @rule(
        which=st.sampled_from(("new", "new", "again", "changed")),
        back=st.integers(min_value=0, max_value=7),
        account=st.sampled_from((FIRST, SECOND, FIRST, SECOND, NOWHERE)),
        deltas=DELTAS,
        as_int=st.booleans(),
    )
    def trade(self, which: str, back: int, account: int, deltas: Deltas, as_int: bool) -> None:
        """A new trade; the exchange's retry of one (a refused trade left no trace, so it is
        tried afresh); or a known externalId with another body."""
        known = list(self.last_trade)
        if not known or (which == "new" and len(known) < IDS):
            external_id = f"trade-{self.run}-{len(known)}"
        else:  # the recent ones more often
            external_id = known[max(0, len(known) - 1 - back)]
        same = which == "again" and external_id in self.last_trade
        trade = self.last_trade[external_id] if same else Trade(account, deltas)
        self.send_trade(external_id, trade, as_int)

    # -- after every step --

    @precondition(lambda self: bool(self.senders))
    @invariant()
    def balances_are_the_models(self) -> None:
        for account in ACCOUNTS:
            link = self.senders[account]
            response = self.bitgo.http.get(
                f"/internal/v1/accounts/{link.partners_connection_id}",
                headers=self.bitgo.internal(),
            )
            listed = self.answer(response, OK)["balances"]
            assert set(listed) <= set(SUPPORTED), listed
            for currency in SUPPORTED:
                row = listed.get(currency, {"available": "0", "pendingIn": "0", "held": "0"})
                read = (int(row["available"]), int(row["pendingIn"]), int(row["held"]))
                assert read == self.model.balance(account, currency), (account, currency)

    def released(self) -> list[str]:
        return [i for i, record in self.model.records.items() if record.status == "released"]

    def kind_of(self, transfer_id: str, same_kind: bool) -> str:
        kind = self.model.records[transfer_id].request.kind
        return kind if same_kind else KINDS[1 - KINDS.index(kind)]


@pytest.fixture(scope="module")
def api(client: TestClient, keys: Keys) -> BitGo:
    """One BitGo for the module: Hypothesis runs many examples inside one test call."""
    return BitGo(client, keys.private)


# Passing takes seconds; a failure is shrunk, which takes minutes (Hypothesis stops at 5).
@pytest.mark.timeout(600 + EXAMPLES * 8)
def test_transfers_and_trades_follow_the_model(api: BitGo) -> None:
    class OnTheApp(TransfersMachine):
        bitgo = api

    run_state_machine_as_test(OnTheApp, settings=SETTINGS)
