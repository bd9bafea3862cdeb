"""The referral loop: business state, correlation, SLA timers (issue 6)."""
