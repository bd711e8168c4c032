"""One graft end to end: resolve -> plan -> stream -> write -> commit, with its manifest and the publishing
protocol (claim, stage, commit the manifest last). Imports compute, planning and storage."""
