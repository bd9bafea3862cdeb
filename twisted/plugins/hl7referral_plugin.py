from twisted.application.service import ServiceMaker

hl7referral = ServiceMaker(
    "hl7referral", "hl7referral.engine.tap", "HL7 v2 referral interface engine", "hl7referral"
)
