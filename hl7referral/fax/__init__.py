"""The fax transport: the referral packet rendered as a PDF and sent through a gateway plugin."""
