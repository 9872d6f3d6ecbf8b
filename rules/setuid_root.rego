# 9a. A process that is not root making itself root (setuid(0) and friends). Only successful
# calls count: a failed one changed nothing. "Not root" is the real uid before the call
# (`cred.old_uid`): a setuid-root program run by a user has euid 0 but uid 1000 until it calls
# setuid(0), and root dropping to another uid is not an escalation.
package palisade.rules.setuid_root

meta := {
	"id": "setuid_root",
	"title": "Non-root process became root",
	"severity": "high",
	"mitre": ["T1548.001", "T1068"],
	"action": "alert",
	"events": ["cred"],
	"prefilter": {"cred": [{"cred.op": {"in": uid_ops}}]},
}

uid_ops := {"setuid", "setreuid", "setresuid", "commit_creds"}

alerts contains {"message": msg} if {
	input.cred.op in uid_ops
	input.cred.result >= 0
	input.cred.old_uid != 0
	# Any of the ids set to 0 (-1, i.e. 4294967295, leaves one unchanged).
	some uid in input.cred.args
	uid == 0
	msg := sprintf("%s (pid %d, uid %d) became root with %s(%s)", [
		input.process.comm, input.process.pid, input.cred.old_uid, input.cred.op,
		concat(", ", [sprintf("%d", [a]) | some a in input.cred.args]),
	])
}
