"""An OPC UA server (asyncua) for PLCs, SCADA and MES, modelled on OPC 40100-1 (OPC UA for Machine Vision).

What is implemented of OPC 40100-1's concepts, as plain objects and variables (not the companion specification's
information model types, which would need its NodeSet):

- a vision system per source (`Objects/anomalyd/Sources/<source>`), with its system state as text
  (`SystemState`: Ready | Busy | Error | Disconnected; 40100's state machine is not modelled) and whether the line
  has drifted (`Drift`, with `DriftStartedAt`: the start of the open drift, 1970-01-01 when there is none);
- result management as the last result of that source (`LastResult`: InspectionId, PartId, Result
  OK | NG | no_decision, IsOk, Score, Threshold, RegionCount, ModelVersion, Timestamp, TriggerId, FailSafe, Late);
- counters (`Counters`: Inspected, OK, NG, Rejected, DeadlineMissed, Errors) and processing-time statistics
  (`ProcessingTime`: MinMs, MeanMs, MaxMs);
- methods: `Trigger(PartId) → TriggerId` per source (40100's "StartSingleJob" with a part id),
  `ResetCounters()` per source, and `SelectModelVersion(Version) → ActiveVersion` on the system (40100's recipe
  selection: a model version is the recipe); `ActiveModelVersion` shows the one in use.

Not implemented: 40100's result subscriptions/result transfer and recipe transfer methods, the configuration
management, and its state machine and type definitions.

Access: with `allow_anonymous = false` only configured users may open a session (others get
BadUserAccessDenied / BadIdentityTokenRejected); methods need the `operator` role, `viewer`s browse and read;
nobody writes variables. Without a certificate the endpoint is `None` security and user passwords travel in
plain text: give `certificate` and `private_key` (Basic256Sha256 endpoints) outside a closed cell network.

The server runs its own asyncio loop in a thread. `update(source, values)` is thread-safe and coalescing (the
newest value of each variable is written), so the daemon's writer threads never wait on OPC UA.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import PermissionRuleset, User, UserRole

log = logging.getLogger(__name__)

# Variable name → OPC UA type, per group of a source object.
LAST_RESULT_VARS: dict[str, ua.VariantType] = {
    "InspectionId": ua.VariantType.Int64, "PartId": ua.VariantType.String, "Result": ua.VariantType.String,
    "IsOk": ua.VariantType.Boolean, "Score": ua.VariantType.Double, "Threshold": ua.VariantType.Double,
    "RegionCount": ua.VariantType.Int32, "ModelVersion": ua.VariantType.String,
    "Timestamp": ua.VariantType.DateTime, "TriggerId": ua.VariantType.String, "FailSafe": ua.VariantType.Boolean,
    "Late": ua.VariantType.Boolean,
}
COUNTER_VARS: dict[str, ua.VariantType] = {name: ua.VariantType.Int64 for name in
                                           ("Inspected", "OK", "NG", "Rejected", "DeadlineMissed", "Errors")}
TIME_VARS: dict[str, ua.VariantType] = {name: ua.VariantType.Double for name in ("MinMs", "MeanMs", "MaxMs")}
SOURCE_VARS: dict[str, ua.VariantType] = {"SystemState": ua.VariantType.String, "Line": ua.VariantType.String,
                                          "TriggerMode": ua.VariantType.String,
                                          "LastError": ua.VariantType.String,
                                          # the source's drift (daemon/zero_label/drift.py): True from the event to its end
                                          "Drift": ua.VariantType.Boolean, "DriftStartedAt": ua.VariantType.DateTime}
GROUPS: dict[str, dict[str, ua.VariantType]] = {"": SOURCE_VARS, "LastResult": LAST_RESULT_VARS,
                                                "Counters": COUNTER_VARS, "ProcessingTime": TIME_VARS}
# A handler's refusal (daemon.plant.trigger.TriggerError codes) → the status code the OPC UA client sees.
ERROR_STATUS = {
    "bad_part_id": ua.StatusCodes.BadInvalidArgument, "busy": ua.StatusCodes.BadTooManyOperations,
    "not_triggered": ua.StatusCodes.BadInvalidState, "wrong_channel": ua.StatusCodes.BadInvalidState,
    "unknown_source": ua.StatusCodes.BadNotFound, "unknown_version": ua.StatusCodes.BadNotFound,
    "error": ua.StatusCodes.BadInternalError,
}
_CALL_REQUEST = ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)
_WRITE_REQUESTS = {ua.NodeId(i) for i in (ua.ObjectIds.WriteRequest_Encoding_DefaultBinary,
                                          ua.ObjectIds.AddNodesRequest_Encoding_DefaultBinary,
                                          ua.ObjectIds.DeleteNodesRequest_Encoding_DefaultBinary,
                                          ua.ObjectIds.AddReferencesRequest_Encoding_DefaultBinary,
                                          ua.ObjectIds.DeleteReferencesRequest_Encoding_DefaultBinary)}


class OpcUaCommandError(Exception):
    """What a handler raises to refuse a method call: `code` picks the status code (see ERROR_STATUS)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class OpcUaUserEntry:
    name: str
    password_sha256: str  # hex digest of the password
    role: str = "operator"  # operator | viewer


@dataclass
class OpcUaSettings:
    endpoint: str = "opc.tcp://127.0.0.1:4840/anomalyd"
    namespace: str = "urn:anomalyd:machine-vision"
    allow_anonymous: bool = False
    users: Sequence[OpcUaUserEntry] = ()
    certificate: str | None = None
    private_key: str | None = None
    security: Sequence[str] = ("None",)
    log_level: str = "WARNING"  # asyncua's loggers: at INFO its server start alone writes about a thousand lines


@dataclass
class OpcUaSource:
    id: str
    line: str
    trigger: str | None = None  # opcua | mqtt | None (free-running)


@dataclass
class OpcUaHandlers:
    """The daemon's side of the methods; each may raise OpcUaCommandError. They run on asyncua's thread pool."""

    trigger: Callable[[str, Any], str]  # (source, part id) → trigger id
    select_model: Callable[[str], str]  # version → the active version
    reset_counters: Callable[[str], None]  # source


class _UserManager:
    def __init__(self, settings: OpcUaSettings) -> None:
        self.allow_anonymous = settings.allow_anonymous
        self.users = {user.name: user for user in settings.users}

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is None:
            if self.allow_anonymous:
                return User(role=UserRole.Anonymous, name=None)
            log.warning("OPC UA: anonymous session refused (allow_anonymous = false)")
            return None
        entry = self.users.get(username)
        digest = hashlib.sha256((password or "").encode()).hexdigest()
        if entry is None or not hmac.compare_digest(digest, entry.password_sha256.lower()):
            log.warning("OPC UA: session refused for unknown user or wrong password (user %r)", username)
            return None
        return User(role=UserRole.User, name=username)


class _Permissions(PermissionRuleset):
    """Operators call methods; everyone with a session browses and reads; nobody writes or edits nodes."""

    def __init__(self, operators: set[str]) -> None:
        self.operators = operators

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        if action_type_id in _WRITE_REQUESTS:
            return False
        if action_type_id == _CALL_REQUEST:
            return getattr(user, "name", None) in self.operators
        return True


@dataclass
class _SourceNodes:
    variables: dict[str, Any] = field(default_factory=dict)  # "Group.Name" or "Name" → Node


class OpcUaServer:
    """Start/stop from any thread; `update()` from any thread."""

    def __init__(self, settings: OpcUaSettings, sources: Sequence[OpcUaSource], handlers: OpcUaHandlers) -> None:
        self.settings = settings
        self.sources = list(sources)
        self.handlers = handlers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._server: Server | None = None
        self._nodes: dict[str, _SourceNodes] = {}
        self._system_vars: dict[str, Any] = {}
        self._pending: dict[tuple[str, str], Any] = {}  # (source or "", variable) → newest value
        self._pending_lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self.crashed: BaseException | None = None
        self.endpoint_url: str = settings.endpoint

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, timeout: float | None = 30.0) -> None:
        """Start the server; raises (naming the endpoint) when it cannot listen within `timeout`. None: do not
        wait (building the address space takes seconds of CPU); `started`/`start_error` tell the outcome."""
        logging.getLogger("asyncua").setLevel(self.settings.log_level)
        self._thread = threading.Thread(target=self._run, name="opcua-server", daemon=True)
        self._thread.start()
        if timeout is None:
            return
        if not self._started.wait(timeout):
            raise RuntimeError(f"OPC UA server on {self.settings.endpoint} did not start within {timeout:.0f}s")
        if self._start_error is not None:
            raise RuntimeError(f"OPC UA server on {self.settings.endpoint}: {self._start_error}") from \
                self._start_error

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def started(self) -> bool:
        """Listening (False while starting, or when the start failed: see `start_error`)."""
        return self._started.is_set() and self._start_error is None

    @property
    def start_error(self) -> BaseException | None:
        return self._start_error

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def update(self, source_id: str, values: dict[str, Any]) -> None:
        """Set variables of a source (`"Counters.OK": 3`, `"SystemState": "Ready"`); "" = the system object."""
        with self._pending_lock:
            for name, value in values.items():
                self._pending[(source_id, name)] = value
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing at shutdown
                loop.call_soon_threadsafe(wake.set)

    # --- the server's thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
                log.error("OPC UA server on %s cannot start: %s", self.settings.endpoint, exc)
            else:
                self.crashed = exc
                log.exception("OPC UA server crashed")
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        server = await self._build()
        async with server:
            self._started.set()
            log.info("OPC UA server on %s (%d sources, anonymous %s)", self.settings.endpoint, len(self.sources),
                     "allowed" if self.settings.allow_anonymous else "refused")
            while not self._stop.is_set():
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                self._wake.clear()
                await self._write_pending()

    async def _build(self) -> Server:
        s = self.settings
        server = Server(user_manager=_UserManager(s))
        await server.init()
        server.set_endpoint(s.endpoint)
        server.set_server_name("anomalyd")
        if s.certificate and s.private_key:
            await server.load_certificate(s.certificate)
            await server.load_private_key(s.private_key)
        policies = {"None": ua.SecurityPolicyType.NoSecurity,
                    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}
        operators = {user.name for user in s.users if user.role == "operator"}
        server.set_security_policy([policies[name] for name in s.security], permission_ruleset=_Permissions(operators))
        tokens: list[type] = [ua.UserNameIdentityToken]
        if s.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        idx = await server.register_namespace(s.namespace)
        root = await server.nodes.objects.add_object(idx, "anomalyd")
        self._system_vars["ActiveModelVersion"] = await root.add_variable(
            idx, "ActiveModelVersion", ua.Variant("", ua.VariantType.String))
        self._system_vars["SystemState"] = await root.add_variable(
            idx, "SystemState", ua.Variant("Ready", ua.VariantType.String))
        await root.add_method(idx, "SelectModelVersion", self._select_model, [ua.VariantType.String],
                              [ua.VariantType.String])
        folder = await root.add_folder(idx, "Sources")
        for source in self.sources:
            obj = await folder.add_object(idx, source.id)
            nodes = _SourceNodes()
            for group, variables in GROUPS.items():
                parent = obj if not group else await obj.add_object(idx, group)
                for name, vtype in variables.items():
                    key = f"{group}.{name}" if group else name
                    nodes.variables[key] = await parent.add_variable(idx, name, ua.Variant(_initial(vtype), vtype))
            await obj.add_method(idx, "Trigger", self._method(self._trigger, source.id),
                                 [ua.VariantType.String], [ua.VariantType.String])
            await obj.add_method(idx, "ResetCounters", self._method(self._reset, source.id), [], [])
            self._nodes[source.id] = nodes
            with self._pending_lock:
                self._pending.setdefault((source.id, "Line"), source.line)
                self._pending.setdefault((source.id, "TriggerMode"), source.trigger or "free-running")
        await self._write_pending()
        self._server = server
        return server

    async def _write_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for (source_id, name), value in pending.items():
            node = self._system_vars.get(name) if source_id == "" else \
                self._nodes.get(source_id, _SourceNodes()).variables.get(name)
            if node is None:
                log.debug("OPC UA: no variable %s for %r", name, source_id)
                continue
            vtype = _type_of(source_id, name)
            try:
                await node.write_value(ua.Variant(_coerce(value, vtype), vtype))
            except Exception:
                log.exception("OPC UA: cannot write %s of %r", name, source_id)

    # --- methods ------------------------------------------------------------------------------------------------

    @staticmethod
    def _method(func: Callable[..., Any], source_id: str) -> Callable[..., Any]:
        def call(parent: Any, *args: Any) -> Any:
            return func(source_id, *args)
        return call

    def _refused(self, source_id: str, what: str, exc: OpcUaCommandError) -> ua.StatusCode:
        log.warning("OPC UA %s on %r refused: %s", what, source_id or "system", exc.message)
        if source_id:
            self.update(source_id, {"LastError": f"{what}: {exc.code}: {exc.message}"})
        return ua.StatusCode(ERROR_STATUS.get(exc.code, ua.StatusCodes.BadInternalError))

    def _trigger(self, source_id: str, part: ua.Variant | None = None) -> Any:
        value = part.Value if isinstance(part, ua.Variant) else part
        try:
            trigger_id = self.handlers.trigger(source_id, value)
        except OpcUaCommandError as exc:
            return self._refused(source_id, "Trigger", exc)
        self.update(source_id, {"LastError": ""})
        return [ua.Variant(trigger_id, ua.VariantType.String)]

    def _reset(self, source_id: str) -> Any:
        try:
            self.handlers.reset_counters(source_id)
        except OpcUaCommandError as exc:
            return self._refused(source_id, "ResetCounters", exc)
        return []

    def _select_model(self, parent: Any, version: ua.Variant | None = None) -> Any:
        value = version.Value if isinstance(version, ua.Variant) else version
        try:
            if not isinstance(value, str) or not value:
                raise OpcUaCommandError("bad_part_id", "the model version must be a non-empty string")
            active = self.handlers.select_model(value)
        except OpcUaCommandError as exc:
            return self._refused("", "SelectModelVersion", exc)
        self.update("", {"ActiveModelVersion": active})
        return [ua.Variant(active, ua.VariantType.String)]


def _type_of(source_id: str, name: str) -> ua.VariantType:
    if source_id == "":
        return ua.VariantType.String
    group, _, var = name.rpartition(".")
    return GROUPS.get(group, {}).get(var, ua.VariantType.String)


def _initial(vtype: ua.VariantType) -> Any:
    return {ua.VariantType.String: "", ua.VariantType.Boolean: False, ua.VariantType.Double: 0.0,
            ua.VariantType.DateTime: datetime(1970, 1, 1, tzinfo=timezone.utc)}.get(vtype, 0)


def _coerce(value: Any, vtype: ua.VariantType) -> Any:
    if value is None:
        return _initial(vtype)
    if vtype in (ua.VariantType.Int64, ua.VariantType.Int32):
        return int(value)
    if vtype == ua.VariantType.Double:
        return float(value)
    if vtype == ua.VariantType.Boolean:
        return bool(value)
    if vtype == ua.VariantType.String:
        return str(value)
    return value
