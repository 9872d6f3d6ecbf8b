# 8. Attaching to or writing into another process: credential theft from memory, code injection.
package palisade.rules.ptrace_attach

meta := {
	"id": "ptrace_attach",
	"title": "Process attach or memory write with ptrace",
	"severity": "high",
	"mitre": ["T1055.008", "T1003.007"],
	"action": "alert",
	"events": ["ptrace"],
	"prefilter": {"ptrace": [{"ptrace.request": {"in": injecting_requests}}]},
}

# ATTACH, SEIZE, and the requests that change a tracee: POKETEXT/POKEDATA/POKEUSER, SETREGS,
# SETFPREGS, SETREGSET.
injecting_requests := {16, 16902, 4, 5, 6, 13, 15, 16901}

alerts contains {"message": msg} if {
	input.ptrace.request in injecting_requests
	input.ptrace.target_pid != input.process.pid
	name := object.get(input.ptrace, "request_name", sprintf("request %d", [input.ptrace.request]))
	outcome := {true: "", false: sprintf(" (failed: errno %d)", [0 - input.ptrace.result])}[input.ptrace.result >= 0]
	msg := sprintf("%s (pid %d) used %s on pid %d%s", [input.process.comm, input.process.pid, name, input.ptrace.target_pid, outcome])
}
