"""grammar/mixer.lark ships as package data of mixerc.grammar."""
