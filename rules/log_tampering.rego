# 14. Log tampering: emptying log files to hide what happened -- an open with O_TRUNC
# (`: > /var/log/auth.log`), truncate(2) or ftruncate(2) (`truncate -s0`). A log rotator
# installed in a system directory is exempt. An application that recreates its own log below
# /var/log with O_TRUNC at start-up alerts too: the log is emptied all the same.
package palisade.rules.log_tampering

import data.palisade.lib
import data.palisade.lib.open_path
import data.palisade.lists

meta := {
	"id": "log_tampering",
	"title": "Log file truncated",
	"severity": "medium",
	"mitre": ["T1070.002"],
	"action": "alert",
	"events": ["open"],
	"prefilter": {"open": [{"open.truncate": true, "open.path": {"path_prefix": lists.log_paths}}]},
}

system_prefixes := [concat("", [dir, "/"]) | some dir in lists.system_dirs]

rotator if {
	lib.basename(input.process.exe) in lists.log_rotators
	strings.any_prefix_match(input.process.exe, system_prefixes)
}

alerts contains {"message": msg} if {
	input.open.truncate
	path := open_path
	strings.any_prefix_match(path, lists.log_paths)
	not rotator
	msg := sprintf("%s (pid %d) truncated log %s with %s%s", [
		input.process.comm, input.process.pid, path, input.open.op, lib.outcome(input.open.result),
	])
}
