"""``hl7referral answer``: the specialist's answer from the command line, for practices without an interface.

It does what the engine does when the practice's EHR sends the answer over MLLP: the event is
applied to the referral (sent to us over Direct), and the 360X answer is owed to the initiator
in the same transaction (``engine/answering.py``). The running engine packs and sends it at its
next Direct tick; with the engine stopped, it waits in the store and leaves at the next start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from .cli_loop import _parse_now, _sqlite_errors, _who, referral_to_change

WHAT = ("accept", "decline", "book", "reschedule", "cancel-appointment", "no-show", "confirm-cancel",
        "refuse-cancel", "note", "interim-note")


def register(main, config_options, readable_errors, load, open_store, emit, fail) -> None:
    @main.command("answer")
    @config_options
    @click.argument("ref_id")
    @click.argument("what", type=click.Choice(WHAT))
    @click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--reason", default="", help="Why (a decline, a refused cancel): ORC-16 of the OSU^O51.")
    @click.option("--appointment", "appointment", default="",
                  help="Appointment id (book, reschedule, no-show, cancel-appointment); "
                       "default: a new one for book, the last booked for the others.")
    @click.option("--start", "start", default="", metavar="ISO", help="Appointment start (book, reschedule).")
    @click.option("--now", "now_text", metavar="ISO", help="When it happened (default: now).")
    @click.option("--by", default=None, help="Who answers (audit trail; default: the OS user).")
    @readable_errors
    @_sqlite_errors
    def answer(config, store, overrides, ref_id, what, file, reason, appointment, start, now_text, by) -> None:
        """Answer a referral sent to us: accept, decline, book, no-show, note FILE, ...

        REF_ID is the referral id (as `referrals list` shows it). The 360X message (OSU^O51,
        SIU^S12/S15/S26; a C-CDA Consultation Note for `note`, built from FILE's text, or FILE
        itself when it is a C-CDA) goes to the referring engine over Direct.

        \b
          hl7referral answer 990001@1.3.6.1.4.1.99999.1.15 accept
          hl7referral answer 990001@1.3.6.1.4.1.99999.1.15 book --start 2026-12-03T09:30:00Z
          hl7referral answer 990001@1.3.6.1.4.1.99999.1.15 note consult.txt
        """
        from .engine import answering
        from .loop.correlate import Note, Observation
        from .loop.states import Event, Kind
        from .loop.tracker import Tracker, iso
        from .store.relay import RECIPIENT, Relay

        if what in ("note", "interim-note") and file is None:
            fail(f"answer {what} needs FILE: the note's text (or a C-CDA document)", 2)
        if what in ("book", "reschedule") and not start:
            fail(f"answer {what} needs --start ISO (the appointment's start)", 2)
        cfg = load(config, store, overrides)
        now = _parse_now(now_text)
        at = iso(now)
        s, loop, row = referral_to_change(cfg, ref_id, fail)
        try:
            rid = row["referral_id"]
            side = Relay(s).side_of(rid)
            if side is None or side.side != RECIPIENT:
                fail(f"referral {rid} is one we sent, not one sent to us: its answers come from the specialist", 1)
            if start:
                try:
                    starts = iso(_parse_now(start))
                except Exception:   # noqa: BLE001 - _parse_now says what is wrong
                    fail(f"--start {start!r}: not an ISO datetime (2026-12-03T09:30:00Z)", 2)
            else:
                starts = ""
            note = None
            if what in ("book", "reschedule"):
                appointment = appointment or "APPT" + hashlib.sha256(f"{rid}/{starts}".encode()).hexdigest()[:10]
                event = Event(Kind.BOOKED, at, appointment=appointment, starts=starts, source="answer")
            elif what in ("no-show", "cancel-appointment"):
                booked = [e for e in loop.events(rid) if e.kind == Kind.BOOKED]
                if not appointment and not booked:
                    fail(f"referral {rid} has no booked appointment: give --appointment", 1)
                last = booked[-1] if booked else None
                appointment = appointment or last.appointment
                starts = starts or (last.starts if last and last.appointment == appointment else "")
                kind = Kind.NO_SHOW if what == "no-show" else Kind.APPOINTMENT_CANCELLED
                event = Event(kind, at, appointment=appointment, starts=starts, source="answer")
            elif what in ("note", "interim-note"):
                content = file.read_bytes()
                is_cda = b"ClinicalDocument" in content[:4096]
                note = Note(format="cda" if is_cda else "text", media_type="text/xml" if is_cda else "text/plain",
                            content=content, title="Consultation Note" if what == "note" else "Interim note")
                event = Event(Kind.CONSULT_NOTE if what == "note" else Kind.INTERIM_NOTE, at, source="answer")
            else:
                kind = {"accept": Kind.ACCEPTED, "decline": Kind.DECLINED, "confirm-cancel": Kind.CANCEL_CONFIRMED,
                        "refuse-cancel": Kind.CANCEL_REFUSED}[what]
                event = Event(kind, at, source="answer")
            obs = Observation(message_type=f"answer {what}", keys=(("referral", rid),), events=(event,), note=note)
            who = _who(by)
            with s.atomic():
                out = Tracker(s, cfg.loop).observe(obs, now=now, origin=f"hl7referral answer by {who}", raw=None)
                if out.referral_id is None:
                    fail(f"referral {rid}: {out.reason}", 1)
                owed = answering.owe_from_ehr(s, cfg, referral_id=rid, obs=obs, raw=None,
                                              now_hl7=now.strftime("%Y%m%d%H%M%S+0000"), at=at, reason=reason,
                                              origin=f"answer by {who}")
        finally:
            s.close()
        to = side.partner or "?"
        went = f"; {', '.join(owed)} owed to {to} (sent by Direct at the engine's next tick)" if owed else \
            "; nothing new to send (answered already)"
        click.echo(f"referral {rid}: {out.before.value if out.before else '?'} -> "
                   f"{out.after.value if out.after else '?'}{went}")


__all__ = ["register", "WHAT"]
