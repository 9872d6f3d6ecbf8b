# 9b. Setting the setuid or setgid bit: a file that runs as its owner is a way back to root.
package palisade.rules.setuid_bit

import data.palisade.lib
import data.palisade.lib.chmod_path

meta := {
	"id": "setuid_bit",
	"title": "Setuid or setgid bit set on a file",
	"severity": "high",
	"mitre": ["T1548.001"],
	"action": "alert",
	"events": ["chmod"],
	"prefilter": {"chmod": [{"chmod.mode": {"any_bits": 3072}}, {"chmod.setuid": true}, {"chmod.setgid": true}]},
}

# S_ISUID 04000, S_ISGID 02000.
bit_names contains "setuid" if bits.and(input.chmod.mode, 2048) != 0

bit_names contains "setuid" if input.chmod.setuid

bit_names contains "setgid" if bits.and(input.chmod.mode, 1024) != 0

bit_names contains "setgid" if input.chmod.setgid

target := chmod_path if input.chmod.path != ""

else := sprintf("fd %d", [input.chmod.fd])

alerts contains {"message": msg} if {
	count(bit_names) > 0
	mode := lib.octal_mode(input.chmod.mode)
	msg := sprintf("%s (pid %d) set the %s bit on %s (mode %s)%s", [
		input.process.comm, input.process.pid, concat("+", bit_names), target, mode, lib.outcome(input.chmod.result),
	])
}
