"""A doctor check's result: its id, title, status, one-line summary, fix and details
(the JSON schema's "checks" entries)."""


SCHEMA = "hpcc-doctor/1"
STATUSES = ("ok", "warn", "fail", "off", "skip")


class Check:
    def __init__(self, id, title, status, summary, fix=None, **details):
        assert status in STATUSES
        self.id, self.title, self.status, self.summary, self.fix = id, title, status, summary, fix
        self.details = details

    def as_dict(self):
        return {"id": self.id, "title": self.title, "status": self.status,
                "summary": self.summary, "fix": self.fix, "details": self.details}
