"""HylaFAX as a fax gateway: hfaxd's client-server protocol, spoken with the stdlib :mod:`ftplib`.

hfaxd's protocol is FTP with job commands added (``man hfaxd``), so :class:`ftplib.FTP`
carries it: ``sendcmd`` for the commands, ``storbinary`` for the upload, ``retrlines`` for
the queue listings. One call is one session (connect, log in, work, QUIT).

A submit follows what ``sendfax -vv`` shows sendfax doing (without TZONE, SCHEDPRI and the
page-size and cover-page parameters, which hfaxd's defaults cover)::

    USER <user>  [PASS <password>]    log in (hfaxd asks for PASS with a 331)
    FORM PDF, TYPE I, PASV, STOT      the PDF into hfaxd's tmp; the 226 reply names the file
    JNEW                              "200 New job created: jobid: 7 groupid: 7."
    JPARM FROMUSER, LASTTIME, MAXDIALS, MAXTRIES, DIALSTRING, VRES, NOTIFY, JOBINFO (our key)
    JPARM DOCUMENT <tmp file>         link the upload into the job (docq/doc7.pdf.7)
    JSUBM                             hand the job to faxq; "200 Job 7 submitted."
    JPARM STATE, STATUS, NPAGES       the first status, read back in the same session
    QUIT

Invariants
----------
* Nothing is left behind by a submit that fails before JSUBM: hfaxd deletes a job that was
  created (JNEW) but never submitted, and the session's temporary files, when the session
  ends. So a network failure up to that point is ``retry`` and a 5xx reply (hfaxd refused
  the login, a value or the job) is ``rejected``.
* A submit that was sent but not confirmed is ``unknown``: no answer to JSUBM (a timeout, a
  dropped connection) or a 4xx answer (hfaxd wrote the queue file but faxq did not
  acknowledge it; faxq may still have taken it). ``find(key)`` settles it: the key is the
  job's jobtag (``JPARM JOBINFO``) and ``find`` lists sendq and doneq by jobtag. (A job
  hfaxd never handed to faxq is there, SUSPENDED, until its session has ended.)
* Once JSUBM is answered 200 the job exists: a failure to read the first status back does
  not fail the submit (``Submitted.status`` is then None).
* LASTTIME is always sent. hfaxd's default job carries a kill time of "3 hours" as if it were
  an absolute time (1970), so a job without LASTTIME is killed at once: "Kill time expired".
* Job ids are hfaxd's job numbers, as ``faxstat`` shows them. Only digits are sent as a job
  id, and a key with control characters is refused, so nothing can smuggle a command in.
* Messages carry the gateway address, job ids, keys and hfaxd's reply text; never the PDF
  or the fax number as given (hfaxd's replies may echo the dial string: a practice's fax
  number, not PHI).
"""

from __future__ import annotations

import ftplib
import io
import os
import re
from typing import Any

from .gateway import Callback, FaxJob, GatewayError, GatewaySettingsError, GatewayStatus, Status, Submitted

# hfaxd's job states (JPARM STATE words; sendq(5) numbers them 1..8) -> ours.
STATES = {
    "SUSPENDED": Status.QUEUED,  # 1: not being scheduled (a fresh job, before faxq takes it)
    "PENDING": Status.QUEUED,    # 2: waiting for its time to send
    "SLEEPING": Status.QUEUED,   # 3: waiting for a scheduled timeout (between redials)
    "BLOCKED": Status.QUEUED,    # 4: waiting for concurrent work to the same number
    "READY": Status.QUEUED,      # 5: ready, waiting for a modem
    "ACTIVE": Status.SENDING,    # 6: being sent
    "DONE": Status.DELIVERED,    # 7: completed with success
    "FAILED": Status.FAILED,     # 8: completed with failure (gave up, killed, kill time expired)
}
# The one-letter states of a queue listing (JOBFMT %a), for find(): which of several jobs with one key wins.
_LETTER_RANK = {"D": 2, "F": 0}   # done beats failed; anything else (T P S B W R) is still in sendq

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 4559,
    "user": "hl7referral",
    "password_env": "",      # the name of an environment variable that holds the password; "" = none
    "timeout": 30.0,         # seconds, for the connection and each reply
    "lasttime": "000300",    # kill time DDHHMM after submission: 3 hours, sendfax's default
    "maxdials": 12,
    "maxtries": 3,
    "resolution": "fine",    # fine: VRES 196 lines/inch; normal: 98
    "notify": "none",        # hfaxd's e-mail notice to the job's owner: none, done, requeue, done+requeue
    "dial_prefix": "",       # put before the digits (an outside line: "9,"); only with number_format "digits"
    "number_format": "e164",  # e164: a leading + and the digits; digits: the digits only
}
RESOLUTIONS = {"fine": 196, "normal": 98}
NOTIFY = ("none", "done", "requeue", "done+requeue")
NUMBER_FORMATS = ("e164", "digits")

_FILE = re.compile(r"FILE:\s*([^\s)]+)")   # "226 Transfer complete (FILE: /tmp/doc5.pdf)." (no ")" or ".")
_JOBID = re.compile(r"jobid:\s*(\d+)")
_NUMBER = re.compile(r"\+?[0-9 ()./-]+")    # what a directory's fax number may look like
_PREFIX = re.compile(r"[0-9*#,]*")
# Printable ASCII, no space at either end, no backslash at the end (a queue file line ending in one continues).
_KEY = re.compile(r"(?:[!-~][ -~]{0,198})?[!-\[\]-~]")
_LASTTIME = re.compile(r"(\d\d)([01]\d|2[0-3])([0-5]\d)")


class HylaFAXGateway:
    """A :class:`~hl7referral.fax.gateway.FaxGateway` on one hfaxd; see the module's invariants."""

    name = "hylafax"
    supports_callbacks = False   # HylaFAX posts nothing back: the engine polls status()

    def __init__(self, settings: dict[str, Any]) -> None:
        s = _validate(settings)
        self.host: str = s["host"]
        self.port: int = s["port"]
        self.user: str = s["user"]
        self.timeout: float = float(s["timeout"])
        self.lasttime: str = s["lasttime"]
        self.maxdials: int = s["maxdials"]
        self.maxtries: int = s["maxtries"]
        self.vres: int = RESOLUTIONS[s["resolution"]]
        self.notify: str = s["notify"]
        self.dial_prefix: str = s["dial_prefix"]
        self.number_format: str = s["number_format"]
        self.password = ""
        if s["password_env"]:
            password = os.environ.get(s["password_env"])
            if not password:
                raise GatewaySettingsError("password_env", f"the environment variable {s['password_env']} is not set")
            if any(c in password for c in "\r\n"):
                raise GatewaySettingsError("password_env", "the password has a line break in it")
            self.password = password
        self.where = f"hylafax {self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<HylaFAXGateway {self.user}@{self.host}:{self.port}>"

    # -- the gateway interface ----------------------------------------------------------

    def submit(self, job: FaxJob) -> Submitted:
        key = _quoted(self._check_key(job.key))
        dialstring = self.dialstring(job.number)
        if not job.pdf.startswith(b"%PDF-"):
            raise GatewayError(f"{self.where}: the document of {job.key} is not a PDF", "rejected")
        sent = False   # JSUBM on the wire: from here on a missing answer is "unknown"
        ftp: ftplib.FTP | None = None
        try:
            ftp = self._open()
            ftp.sendcmd("FORM PDF")   # names the upload doc<N>.pdf; hfaxd checks the type itself too
            reply = ftp.storbinary("STOT", io.BytesIO(job.pdf))   # sends TYPE I first
            m = _FILE.search(reply)
            if m is None:
                raise GatewayError(f"{self.where}: no file name in the upload's reply: {reply}", "retry")
            tmpfile = m.group(1)
            reply = ftp.sendcmd("JNEW")
            m = _JOBID.search(reply)
            if m is None:
                raise GatewayError(f"{self.where}: no job id in the reply to JNEW: {reply}", "retry")
            job_id = m.group(1)
            for parm in (f"FROMUSER {_quoted(self.user)}",
                         f"LASTTIME {self.lasttime}",   # never omit (see the module's invariants)
                         f"MAXDIALS {self.maxdials}",
                         f"MAXTRIES {self.maxtries}",
                         f"DIALSTRING {_quoted(dialstring)}",
                         f"VRES {self.vres}",
                         f"NOTIFY {self.notify.upper()}",
                         f"JOBINFO {key}",             # the jobtag: find(key) looks for it
                         f"DOCUMENT {tmpfile}"):
                ftp.sendcmd(f"JPARM {parm}")
            sent = True
            ftp.sendcmd(f"JSUBM {job_id}")
        except GatewayError:
            _close(ftp, polite=True)
            raise
        except ftplib.error_perm as exc:        # 5xx: refused; hfaxd drops the unsubmitted job at QUIT
            _close(ftp, polite=True)
            what = "refused the job" if sent else "refused the submit"
            raise GatewayError(f"{self.where} {what} ({job.key}): {_text(exc)}", "rejected") from None
        except ftplib.error_temp as exc:        # 4xx
            _close(ftp, polite=True)
            if sent:   # the queue file was written; faxq may have it (find settles it)
                raise GatewayError(f"{self.where} did not confirm the job ({job.key}): {_text(exc)}",
                                   "unknown") from None
            raise GatewayError(f"{self.where} cannot take the job now ({job.key}): {_text(exc)}", "retry") from None
        except (OSError, EOFError, ftplib.Error) as exc:   # network, timeout, a reply out of protocol
            _close(ftp, polite=False)
            if sent:
                raise GatewayError(f"{self.where}: no answer to the submit of {job.key}: {_describe(exc)}",
                                   "unknown") from None
            raise GatewayError(f"{self.where}: the submit of {job.key} did not get through: {_describe(exc)}",
                               "retry") from None
        # The job exists now: nothing below may turn this submit into an error.
        status: GatewayStatus | None = None
        try:
            status = self._read_status(ftp)
        except (ftplib.Error, GatewayError):
            pass
        except (OSError, EOFError):   # a timeout: do not wait for the answer to QUIT as well
            _close(ftp, polite=False)
        _close(ftp, polite=True)
        return Submitted(job_id, status)

    def status(self, job_id: str) -> GatewayStatus:
        jid = self._check_job_id(job_id)
        ftp = self._session("status")
        try:
            failure: GatewayError | None = None
            # Twice: faxq moves a finished job from sendq to doneq, and a JOB or JPARM that meets
            # the move half-way answers 500 though the job is there.
            for _ in range(2):
                try:
                    ftp.sendcmd(f"JOB {jid}")   # looks in sendq, then doneq
                except ftplib.error_perm as exc:
                    failure = GatewayError(f"{self.where} has no job {jid}: {_text(exc)}", "rejected")
                    continue
                try:
                    return self._read_status(ftp)
                except ftplib.error_perm as exc:
                    failure = GatewayError(f"{self.where}: the state of job {jid}: {_text(exc)}", "retry")
            assert failure is not None
            raise failure
        except (OSError, EOFError, ftplib.Error) as exc:
            _close(ftp, polite=False)
            raise GatewayError(f"{self.where}: the state of job {jid}: {_describe(exc)}", "retry") from None
        finally:
            _close(ftp, polite=True)

    def find(self, key: str) -> str | None:
        """The job submitted with this key (its jobtag), in sendq or doneq; None if there is none.

        Should there be several (hfaxd never de-duplicates), one still in sendq wins, then a
        done one, then a failed one; the newest among equals.
        """
        self._check_key(key)
        ftp = self._session("find")
        best: tuple[int, int] | None = None
        try:
            ftp.sendcmd('JOBFMT "%j %a %J"')   # job id, state letter, jobtag (last: it may hold spaces)
            for queue, base in (("sendq", 3), ("doneq", 0)):
                lines: list[str] = []
                ftp.retrlines(f"LIST {queue}", lines.append)
                for line in lines:
                    parts = line.split(" ", 2)
                    if len(parts) == 3 and parts[0].isdigit() and parts[2] == key:
                        rank = (base + _LETTER_RANK.get(parts[1], 0), int(parts[0]))
                        best = rank if best is None or rank > best else best
        except ftplib.error_perm as exc:
            raise GatewayError(f"{self.where} does not list its queues to {self.user} "
                               f"(looking for {key}): {_text(exc)}", "rejected") from None
        except (OSError, EOFError, ftplib.Error) as exc:
            _close(ftp, polite=False)
            raise GatewayError(f"{self.where}: looking for {key}: {_describe(exc)}", "retry") from None
        finally:
            _close(ftp, polite=True)
        return None if best is None else str(best[1])

    def parse_callback(self, body: bytes, headers: dict[str, str]) -> Callback:
        raise GatewayError("HylaFAX sends no status callbacks (the engine polls it)", "rejected")

    # -- for operators and tests --------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        """Kill the job (faxq moves it to doneq as FAILED, "Job aborted by request"); a finished job is left as is."""
        jid = self._check_job_id(job_id)
        ftp = self._session("cancel")
        try:
            ftp.sendcmd(f"JKILL {jid}")
        except ftplib.error_perm as exc:
            if "already done" in str(exc):   # 504 Job 3 not killed; already done.
                return
            raise GatewayError(f"{self.where} did not kill job {jid}: {_text(exc)}", "rejected") from None
        except (OSError, EOFError, ftplib.Error) as exc:
            _close(ftp, polite=False)
            raise GatewayError(f"{self.where}: killing job {jid}: {_describe(exc)}", "retry") from None
        finally:
            _close(ftp, polite=True)

    def dialstring(self, number: str) -> str:
        """The dial string for a directory's fax number (GatewayError "rejected" if it is not one).

        The number may have a leading +, digits and the separators space ( ) . / -; nothing else
        (letters would be dropped silently otherwise: a wrong number). ``e164`` keeps the + so
        HylaFAX's dial rules (etc/dialrules) turn it into what the line needs; ``digits`` sends
        ``dial_prefix`` and the digits, as the modem should dial them.
        """
        n = number.strip()
        if not _NUMBER.fullmatch(n):
            raise GatewayError(f"{self.where}: the fax number has characters other than digits, "
                               "a leading + and separators", "rejected")
        digits = re.sub(r"\D", "", n)
        if not 3 <= len(digits) <= 20:
            raise GatewayError(f"{self.where}: the fax number has {len(digits)} digits", "rejected")
        if self.number_format == "e164":
            return ("+" if n.startswith("+") else "") + digits
        return self.dial_prefix + digits

    # -- the session ----------------------------------------------------------------------

    def _open(self) -> ftplib.FTP:
        """Connected and logged in; raises what ftplib and the socket raise."""
        ftp = ftplib.FTP(timeout=self.timeout)
        try:
            ftp.connect(self.host, self.port, timeout=self.timeout)
            reply = ftp.sendcmd(f"USER {self.user}")
            if reply.startswith("3"):   # 331 Password required (hfaxd asks every user it may refuse)
                if not self.password:
                    raise GatewayError(f"{self.where} asks for a password for {self.user} "
                                       "(set password_env)", "rejected")
                ftp.sendcmd(f"PASS {self.password}")
        except BaseException:
            _close(ftp, polite=False)
            raise
        return ftp

    def _session(self, what: str) -> ftplib.FTP:
        """:meth:`_open` for the queries: a refused login is "rejected", anything else "retry"."""
        try:
            return self._open()
        except ftplib.error_perm as exc:
            raise GatewayError(f"{self.where} refused the login of {self.user}: {_text(exc)}", "rejected") from None
        except (OSError, EOFError, ftplib.Error) as exc:
            raise GatewayError(f"{self.where}: cannot connect for {what}: {_describe(exc)}", "retry") from None

    def _read_status(self, ftp: ftplib.FTP) -> GatewayStatus:
        """The current job's status (JOB set it, or JSUBM's job is still current)."""
        state = _value(ftp.sendcmd("JPARM STATE")).upper()
        reason = _value(ftp.sendcmd("JPARM STATUS"))
        npages = _value(ftp.sendcmd("JPARM NPAGES"))
        if state not in STATES:
            raise GatewayError(f"{self.where}: a job state we do not know: {state!r}", "retry")
        detail = f"{state}: {reason}" if reason else state
        pages = int(npages) if npages.isdigit() and int(npages) > 0 else None
        return GatewayStatus(STATES[state], detail, pages)

    def _check_key(self, key: str) -> str:
        if not _KEY.fullmatch(key):
            raise GatewayError(f"{self.where}: the key {key!r} is not printable ASCII without spaces at its ends "
                               "and no \\ at its end (200 characters at most)", "rejected")
        return key

    def _check_job_id(self, job_id: str) -> str:
        jid = str(job_id).strip()
        if not jid.isascii() or not jid.isdigit():
            raise GatewayError(f"{self.where}: {job_id!r} is not a HylaFAX job id", "rejected")
        return jid


# -- helpers ----------------------------------------------------------------------------


def _validate(settings: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise GatewaySettingsError(unknown[0], f"not a setting of the hylafax gateway (known: {', '.join(DEFAULTS)})")
    s = {**DEFAULTS, **settings}

    def need(key: str, ok: bool, message: str) -> None:
        if not ok:
            raise GatewaySettingsError(key, f"{message}, not {s[key]!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in ("host", "user", "password_env", "lasttime", "resolution", "notify", "dial_prefix", "number_format"):
        need(key, isinstance(s[key], str), "a string")
    need("host", bool(s["host"]) and not any(c.isspace() for c in s["host"]), "a host name or address")
    need("port", is_int(s["port"]) and 0 < s["port"] < 65536, "a TCP port (1-65535)")
    need("user", _KEY.fullmatch(s["user"]) is not None and " " not in s["user"], "a user name without spaces")
    need("password_env", re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*|", s["password_env"]) is not None,
         "the name of an environment variable")
    need("timeout", (is_int(s["timeout"]) or isinstance(s["timeout"], float)) and s["timeout"] > 0,
         "a number of seconds above 0")
    m = _LASTTIME.fullmatch(s["lasttime"])
    need("lasttime", m is not None and s["lasttime"] != "000000",
         "a kill time DDHHMM after submission (days, hours 00-23, minutes 00-59), e.g. 000300 for 3 hours")
    need("maxdials", is_int(s["maxdials"]) and 1 <= s["maxdials"] <= 100, "a number of dials (1-100)")
    need("maxtries", is_int(s["maxtries"]) and 1 <= s["maxtries"] <= 100, "a number of tries (1-100)")
    need("resolution", s["resolution"] in RESOLUTIONS, f"one of {', '.join(RESOLUTIONS)}")
    need("notify", s["notify"] in NOTIFY, f"one of {', '.join(NOTIFY)}")
    need("number_format", s["number_format"] in NUMBER_FORMATS, f"one of {', '.join(NUMBER_FORMATS)}")
    need("dial_prefix", _PREFIX.fullmatch(s["dial_prefix"]) is not None, "digits, *, # and , (a pause)")
    if s["dial_prefix"] and s["number_format"] != "digits":
        # A prefix before "+..." dials nothing sensible; with e164 HylaFAX's dial rules add what the line needs.
        raise GatewaySettingsError("dial_prefix", 'a dial prefix needs number_format = "digits"')
    return s


def _quoted(value: str) -> str:
    """A string argument as hfaxd's lexer reads it: in double quotes, \\ escaping " and \\."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value(reply: str) -> str:
    """ "213 READY" -> "READY" (a JPARM query's answer)."""
    return reply[4:].strip() if len(reply) > 3 and reply[:3].isdigit() else reply.strip()


def _text(exc: BaseException) -> str:
    return str(exc).strip()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _close(ftp: ftplib.FTP | None, *, polite: bool) -> None:
    """QUIT when the connection still works (hfaxd then ends the session at once), else just close."""
    if ftp is None or ftp.sock is None:
        return
    if polite:
        try:
            ftp.quit()
            return
        except (OSError, EOFError, ftplib.Error):
            pass
    ftp.close()
