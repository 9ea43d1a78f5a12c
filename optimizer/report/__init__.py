"""Reports: the Report dataclass and its JSON schema, Markdown/HTML/terminal renderings, the
output README, and the CI gate that reads only report.json."""
