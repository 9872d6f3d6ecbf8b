# 9a. A process that is not root making itself root (setuid(0) and friends), or trying to.
# "Not root" is the real uid before the call (`cred.old_uid`): a setuid-root program run by a
# user has euid 0 but uid 1000 until it calls setuid(0), and root dropping to another uid is
# not an escalation. A call that failed changed nothing, but it is what an exploit probing for
# a way up looks like: it alerts as an attempt (lower severity). The group calls count too
# (setgid(0) by a process that is neither root nor in group 0).
package palisade.rules.setuid_root

import data.palisade.lib

meta := {
	"id": "setuid_root",
	"title": "Non-root process became root, or tried to",
	"severity": "high",
	"mitre": ["T1548.001", "T1068"],
	"action": "alert",
	"events": ["cred"],
	"prefilter": {"cred": [{"cred.op": {"in": set_ops}}]},
}

uid_ops := {"setuid", "setreuid", "setresuid", "commit_creds"}

gid_ops := {"setgid", "setregid", "setresgid"}

set_ops := uid_ops | gid_ops

# Any of the ids set to 0 (-1, i.e. 4294967295, leaves one unchanged).
asks_for_zero if {
	some id in input.cred.args
	id == 0
}

# Who the call is from, and what it asked to become.
escalation := "root" if {
	input.cred.op in uid_ops
	input.cred.old_uid != 0
	asks_for_zero
}

escalation := "group root" if {
	input.cred.op in gid_ops
	input.cred.old_uid != 0
	input.cred.old_gid != 0
	asks_for_zero
}

call := sprintf("%s(%s)", [input.cred.op, concat(", ", [sprintf("%d", [a]) | some a in input.cred.args])])

alerts contains {"message": msg, "severity": "high"} if {
	input.cred.result >= 0
	msg := sprintf("%s (pid %d, uid %d) became %s with %s", [
		input.process.comm, input.process.pid, input.cred.old_uid, escalation, call,
	])
}

alerts contains {"message": msg, "severity": "medium"} if {
	input.cred.result < 0
	msg := sprintf("%s (pid %d, uid %d) tried to become %s with %s%s", [
		input.process.comm, input.process.pid, input.cred.old_uid, escalation, call, lib.outcome(input.cred.result),
	])
}
