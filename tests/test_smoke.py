from hl7referral.send import MLLPClient

REF = (b"MSH|^~\\&|EHR|CLINIC|HL7REF|HUB|20260101120000||REF^I12^REF_I12|SMOKE1|P|2.5.1\r"
       b"RF1|P|R|MED|RP|O|REF0001\rPRD|RP|Doe^Jane^^^Dr\rPID|1||MRN1^^^CLINIC^MR||Test^Pat||19700101|F\r")


def test_engine_accepts_a_referral(engine):
    with MLLPClient(engine.host, engine.port, timeout=5) as c:
        result = c.exchange(REF)
    assert (result.code, result.ok) == ("AA", True)
